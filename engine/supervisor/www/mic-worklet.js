// AudioWorklet: the operator's microphone in the protocol's operator audio format.
//
// The microphone runs at whatever rate the device and browser chose (48 kHz, 44.1 kHz …); the
// supervisor protocol takes mono 24 kHz PCM16. So the first input channel is resampled with a
// windowed-sinc low-pass interpolator (Blackman window, cutoff just below the lower Nyquist
// frequency, so nothing above 12 kHz folds back into the call) and cut into 80 ms frames of
// 1920 samples, one model step each, which go to the page as Int16Array with their RMS level.

const TARGET_RATE = 24000;
const FRAME = 1920;
const HALF_TAPS = 16; // kernel half-width in output-rate samples

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate;
    this.passthrough = inRate === outRate;
    this.cut = Math.min(1, outRate / inRate) * 0.92;
    this.half = Math.ceil(HALF_TAPS / this.cut);
    this.buf = new Float32Array(4096);
    this.len = this.half; // starts with `half` samples of silence as history
    this.t = this.half; // position in buf of the next output sample
  }

  kernel(x) {
    const ax = Math.abs(x);
    if (ax >= this.half) return 0;
    const y = this.cut * x;
    const sinc = y === 0 ? 1 : Math.sin(Math.PI * y) / (Math.PI * y);
    const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / this.half) + 0.08 * Math.cos((2 * Math.PI * x) / this.half);
    return this.cut * sinc * w;
  }

  // Feed input samples; returns the output samples now computable.
  push(input, emit) {
    if (this.passthrough) {
      for (let i = 0; i < input.length; i++) emit(input[i]);
      return;
    }
    if (this.len + input.length > this.buf.length) {
      const bigger = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    while (this.t + this.half < this.len) {
      const center = Math.floor(this.t);
      let acc = 0;
      for (let k = center - this.half + 1; k <= center + this.half; k++) acc += this.buf[k] * this.kernel(this.t - k);
      emit(acc);
      this.t += this.step;
    }
    const drop = Math.floor(this.t) - this.half;
    if (drop > 0) {
      this.buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.t -= drop;
    }
  }
}

class Mic extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, TARGET_RATE);
    this.frame = new Int16Array(FRAME);
    this.fill = 0;
    this.energy = 0;
    this.emit = (x) => {
      const s = Math.max(-1, Math.min(1, x));
      this.energy += s * s;
      this.frame[this.fill++] = Math.round(s * 32767);
      if (this.fill === FRAME) {
        const pcm = this.frame;
        this.port.postMessage({ pcm, rms: Math.sqrt(this.energy / FRAME) }, [pcm.buffer]);
        this.frame = new Int16Array(FRAME);
        this.fill = 0;
        this.energy = 0;
      }
    };
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) this.resampler.push(input[0], this.emit);
    return true;
  }
}

registerProcessor("xswarm-mic", Mic);
