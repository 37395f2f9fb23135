// Listening (WebAudio playback of a call) and talking (the operator's microphone during a takeover).
//
// Playback runs in an AudioContext at the protocol's own 24 kHz, so the server's frames play
// without resampling in the page (the browser converts to the sound card's rate). Every frame
// that starts playing is announced on `document` as an "xswarm-audio" CustomEvent whose detail
// is {callId, direction, seq, capturedAt, playedAt, rms, onset}: the listening meters and the
// "behind live" figure read it, and so can anyone instrumenting the page (the browser tests and
// benchmarks/web.py do). capturedAt is the server's tap time, playedAt when the frame entered
// the audio graph's output, onset the offset (s) of the frame's first loud sample or null.

import { SAMPLE_RATE } from "./connection.js";

const LOUD = 0.05;

export class Listener {
  constructor() {
    this.ctx = null;
    this.node = null;
    this.ready = null;
    this.callId = null;
    this.meta = new Map();
  }

  // Must be called from a user gesture (click): browsers only let such a context make sound.
  start(callId) {
    if (!this.ctx) {
      this.ctx = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
      this.ready = this.ctx.audioWorklet.addModule("/static/player-worklet.js").then(() => {
        this.node = new AudioWorkletNode(this.ctx, "xswarm-player", { numberOfInputs: 0, outputChannelCount: [1] });
        this.node.port.onmessage = (ev) => this._played(ev.data);
        this.node.connect(this.ctx.destination);
      });
    }
    this.ctx.resume();
    this._clear();
    this.callId = callId;
    return this.ready;
  }

  stop() {
    this.callId = null;
    this._clear();
  }

  push(frame) {
    if (frame.callId !== this.callId || !this.node || (frame.direction !== "caller" && frame.direction !== "ai")) return;
    const s = frame.samples;
    let energy = 0;
    let onset = null;
    for (let i = 0; i < s.length; i++) {
      energy += s[i] * s[i];
      if (onset === null && Math.abs(s[i]) > LOUD) onset = i / SAMPLE_RATE;
    }
    this.meta.set(`${frame.direction}:${frame.seq}`, {
      callId: frame.callId,
      direction: frame.direction,
      seq: frame.seq,
      capturedAt: frame.capturedAt,
      rms: Math.sqrt(energy / Math.max(1, s.length)),
      onset,
    });
    if (this.meta.size > 64) this.meta.delete(this.meta.keys().next().value);
    this.node.port.postMessage({ direction: frame.direction, seq: frame.seq, samples: s }, [s.buffer]);
  }

  _played(msg) {
    if (msg.dropped !== undefined) {
      this.meta.delete(`${msg.dropped}:${msg.seq}`); // skipped to stay close to live: never played
      return;
    }
    const key = `${msg.direction}:${msg.seq}`;
    const meta = this.meta.get(key);
    if (!meta) return;
    this.meta.delete(key);
    document.dispatchEvent(new CustomEvent("xswarm-audio", { detail: { ...meta, playedAt: msg.playedAt } }));
  }

  _clear() {
    this.meta.clear();
    if (this.node) this.node.port.postMessage({ clear: true });
  }
}

export class Microphone {
  // onFrame(pcm16: Int16Array of 80 ms at 24 kHz, rms)
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.stream = null;
    this.ctx = null;
  }

  get open() {
    return this.stream !== null;
  }

  async start() {
    if (this.stream) return;
    if (!navigator.mediaDevices || !window.isSecureContext) {
      throw new Error("the microphone needs https (the TLS proxy) or http://127.0.0.1 / localhost (an SSH tunnel)");
    }
    // Echo cancellation on (the operator may be listening on speakers); noise suppression and
    // automatic gain off, so the caller hears what the level meter shows.
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
    const ctx = new AudioContext({ latencyHint: "interactive" });
    try {
      await ctx.audioWorklet.addModule("/static/mic-worklet.js");
      const source = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "xswarm-mic", { numberOfOutputs: 1, outputChannelCount: [1] });
      node.port.onmessage = (ev) => this.onFrame(ev.data.pcm, ev.data.rms);
      const mute = ctx.createGain(); // keeps the node pulled by the graph without playing the mic back
      mute.gain.value = 0;
      source.connect(node).connect(mute).connect(ctx.destination);
      await ctx.resume();
    } catch (err) {
      stream.getTracks().forEach((t) => t.stop());
      ctx.close();
      throw err;
    }
    this.stream = stream;
    this.ctx = ctx;
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close();
    this.stream = null;
    this.ctx = null;
  }
}
