// AudioWorklet: plays the two directions of a listened call, mixed, as their frames arrive.
//
// Each direction has its own queue. Playback of a direction starts once 40 ms is queued (so
// the 80 ms frames, which arrive with a little network jitter, play without gaps) and stops to
// refill when the queue runs dry. A queue longer than 400 ms is cut from the front: late audio
// is worth less than live audio, and listening must stay close to the call. When a frame's
// first sample is played the worklet tells the page (direction, seq, when), which is how the
// page shows how far behind live it is and how the tests know audio reached the graph.

const PREBUFFER = Math.round(0.04 * sampleRate);
const MAX_QUEUED = Math.round(0.4 * sampleRate);
const DIRECTIONS = ["caller", "ai"];

class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queues = { caller: [], ai: [] };
    this.queued = { caller: 0, ai: 0 };
    this.playing = { caller: false, ai: false };
    this.port.onmessage = (ev) => this.receive(ev.data);
  }

  receive(msg) {
    if (msg.clear) {
      for (const d of DIRECTIONS) {
        this.queues[d] = [];
        this.queued[d] = 0;
        this.playing[d] = false;
      }
      return;
    }
    const q = this.queues[msg.direction];
    if (!q) return;
    q.push({ samples: msg.samples, seq: msg.seq, pos: 0 });
    this.queued[msg.direction] += msg.samples.length;
    while (this.queued[msg.direction] > MAX_QUEUED && q.length > 1) {
      const dropped = q.shift();
      this.queued[msg.direction] -= dropped.samples.length - dropped.pos;
      this.port.postMessage({ dropped: msg.direction, seq: dropped.seq });
    }
  }

  process(_inputs, outputs) {
    const channels = outputs[0];
    const out = channels[0];
    out.fill(0);
    for (const d of DIRECTIONS) {
      const q = this.queues[d];
      if (!this.playing[d]) {
        if (this.queued[d] < PREBUFFER) continue;
        this.playing[d] = true;
      }
      let i = 0;
      while (i < out.length) {
        if (!q.length) {
          this.playing[d] = false; // ran dry: wait for the prebuffer again
          break;
        }
        const chunk = q[0];
        if (chunk.pos === 0) {
          this.port.postMessage({ direction: d, seq: chunk.seq, playedAt: Date.now() / 1000 + i / sampleRate });
        }
        const n = Math.min(out.length - i, chunk.samples.length - chunk.pos);
        for (let k = 0; k < n; k++) out[i + k] += chunk.samples[chunk.pos + k];
        chunk.pos += n;
        i += n;
        this.queued[d] -= n;
        if (chunk.pos >= chunk.samples.length) q.shift();
      }
    }
    for (let k = 0; k < out.length; k++) out[k] = Math.max(-1, Math.min(1, out[k]));
    for (let c = 1; c < channels.length; c++) channels[c].set(out);
    return true;
  }
}

registerProcessor("xswarm-player", Player);
