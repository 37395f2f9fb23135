// AudioWorklet: plays the two directions of a listened call, mixed, as their frames arrive.
//
// Each direction has its own queue. Playback of a direction starts once 40 ms is queued (so
// the 80 ms frames, which arrive with a little network jitter, play without gaps) and stops to
// refill when the queue runs dry. One late frame would otherwise leave every later frame that
// much behind for good, so the queue also catches up: when, for two seconds of frames, the
// audio still waiting as each new frame arrived never fell below 20 ms, the excess is skipped.
// A queue longer than 400 ms is cut from the front at once: late audio is worth less than live
// audio, and listening must stay close to the call. When a frame's
// first sample is played the worklet tells the page (direction, seq, when), which is how the
// page shows how far behind live it is and how the tests know audio reached the graph.

const PREBUFFER = Math.round(0.04 * sampleRate);
const MAX_QUEUED = Math.round(0.4 * sampleRate);
const SPARE = Math.round(0.02 * sampleRate);
const CATCHUP_FRAMES = 25; // two seconds of 80 ms frames
const DIRECTIONS = ["caller", "ai"];

class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queues = { caller: [], ai: [] };
    this.queued = { caller: 0, ai: 0 };
    this.playing = { caller: false, ai: false };
    this.lowest = { caller: Infinity, ai: Infinity }; // least audio waiting at a frame's arrival
    this.arrivals = { caller: 0, ai: 0 };
    this.port.onmessage = (ev) => this.receive(ev.data);
  }

  receive(msg) {
    if (msg.clear) {
      for (const d of DIRECTIONS) {
        this.queues[d] = [];
        this.queued[d] = 0;
        this.playing[d] = false;
        this.lowest[d] = Infinity;
        this.arrivals[d] = 0;
      }
      return;
    }
    const d = msg.direction;
    const q = this.queues[d];
    if (!q) return;
    if (this.playing[d]) {
      this.lowest[d] = Math.min(this.lowest[d], this.queued[d]);
      if (++this.arrivals[d] >= CATCHUP_FRAMES) {
        if (this.lowest[d] > SPARE) this.skip(d, this.lowest[d] - SPARE);
        this.lowest[d] = Infinity;
        this.arrivals[d] = 0;
      }
    }
    q.push({ samples: msg.samples, seq: msg.seq, pos: 0, announced: false });
    this.queued[d] += msg.samples.length;
    while (this.queued[d] > MAX_QUEUED && q.length > 1) {
      const dropped = q.shift();
      this.queued[d] -= dropped.samples.length - dropped.pos;
      if (!dropped.announced) this.port.postMessage({ dropped: d, seq: dropped.seq });
    }
  }

  // Drop `count` samples from the front of a direction's queue. A frame skipped whole is
  // announced as dropped; one skipped in part plays its rest.
  skip(d, count) {
    const q = this.queues[d];
    while (count > 0 && q.length) {
      const chunk = q[0];
      const n = Math.min(count, chunk.samples.length - chunk.pos);
      chunk.pos += n;
      this.queued[d] -= n;
      count -= n;
      if (chunk.pos >= chunk.samples.length) {
        q.shift();
        if (!chunk.announced) this.port.postMessage({ dropped: d, seq: chunk.seq });
      }
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
        if (!chunk.announced) {
          chunk.announced = true;
          // when the frame's first sample would have played (its start may have been skipped)
          const playedAt = Date.now() / 1000 + (i - chunk.pos) / sampleRate;
          this.port.postMessage({ direction: d, seq: chunk.seq, playedAt });
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
