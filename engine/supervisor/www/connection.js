// The supervisor socket (protocol v1, docs/supervisor-protocol.md) as the page uses it:
// authenticate with the first message (a browser cannot set an Authorization header on a
// WebSocket), match answers to commands by id, decode audio frames, and reconnect by itself with
// backoff (0.2 s doubling to 5 s, with jitter), as engine/supervisor/client.py does. A refused
// token (close 4401) or a locked-out address (4429) is final: retrying would only count as more
// failed logins.

export const VERSION = 1;
export const SAMPLE_RATE = 24000;
const DIRECTIONS = ["caller", "ai", "operator"];
const HEADER_BYTES = 16;
const CLOSE_UNAUTHORIZED = 4401;
const CLOSE_RATE_LIMITED = 4429;
const COMMAND_TIMEOUT_MS = 10000;

export class CommandError extends Error {
  constructor(answer) {
    super(answer.error || "refused");
    this.code = answer.code;
    this.answer = answer;
  }
}

// One operator audio frame: PCM16 little-endian samples for ``callId``.
export function packAudio(callId, seq, pcm16) {
  const id = new TextEncoder().encode(callId);
  const buf = new ArrayBuffer(HEADER_BYTES + id.length + pcm16.byteLength);
  const view = new DataView(buf);
  view.setUint8(0, VERSION);
  view.setUint8(1, 2); // direction: operator
  view.setUint8(2, 0); // codec: PCM16
  view.setUint8(3, id.length);
  view.setUint32(4, seq >>> 0);
  view.setFloat64(8, Date.now() / 1000);
  new Uint8Array(buf, HEADER_BYTES, id.length).set(id);
  new Uint8Array(buf, HEADER_BYTES + id.length).set(new Uint8Array(pcm16.buffer, pcm16.byteOffset, pcm16.byteLength));
  return buf;
}

// A server audio frame -> {callId, direction, seq, capturedAt, samples: Float32Array}, or null.
export function unpackAudio(buf) {
  if (buf.byteLength < HEADER_BYTES + 1) return null;
  const view = new DataView(buf);
  if (view.getUint8(0) !== VERSION || view.getUint8(2) !== 0) return null; // PCM16 only
  const idLen = view.getUint8(3);
  const start = HEADER_BYTES + idLen;
  if ((buf.byteLength - start) % 2) return null;
  const callId = new TextDecoder().decode(new Uint8Array(buf, HEADER_BYTES, idLen));
  const count = (buf.byteLength - start) / 2;
  const samples = new Float32Array(count);
  for (let i = 0; i < count; i++) samples[i] = view.getInt16(start + 2 * i, true) / 32768;
  return {
    callId,
    direction: DIRECTIONS[view.getUint8(1)] || "?",
    seq: view.getUint32(4),
    capturedAt: view.getFloat64(8),
    samples,
  };
}

export class Connection {
  // handlers: onSnapshot(snap), onEvent(msg), onAudio(frame), onState(state, detail),
  // onRefused(reason). state is "connecting" | "live" | "retrying".
  constructor(url, token, name, handlers) {
    this.url = url;
    this.token = token;
    this.name = name;
    this.h = handlers;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.delay = 200;
    this.closed = false;
    this.timer = null;
  }

  start() {
    this.closed = false;
    this._open();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "logged out");
    this._failPending("logged out");
  }

  get live() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.authed;
  }

  command(type, fields = {}) {
    if (!this.live) return Promise.reject(new CommandError({ error: "not connected", code: "offline" }));
    const id = String(this.nextId++);
    this.ws.send(JSON.stringify({ v: VERSION, type, id, ...fields }));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CommandError({ error: "no answer from the node", code: "timeout" }));
      }, COMMAND_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
    });
  }

  sendBinary(buf) {
    if (this.live && this.ws.bufferedAmount < 256 * 1024) this.ws.send(buf);
  }

  _open() {
    this.authed = false;
    this.h.onState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._retry(String(err));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const auth = { v: VERSION, type: "auth", token: this.token };
      if (this.name) auth.name = this.name;
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") {
        const frame = unpackAudio(ev.data);
        if (frame) this.h.onAudio(frame);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this._onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.authed = false;
      this._failPending("disconnected");
      if (this.closed) return;
      if (ev.code === CLOSE_UNAUTHORIZED || ev.code === CLOSE_RATE_LIMITED) {
        this.closed = true;
        const what = ev.code === CLOSE_RATE_LIMITED ? "too many failed logins from here; wait a minute" : "the node refused this token";
        this.h.onRefused(ev.reason ? `${what} (${ev.reason})` : what); // e.g. "token retired" after a rotation
        return;
      }
      this._retry(ev.reason || `closed (${ev.code})`);
    };
  }

  _onMessage(msg) {
    if (msg.type === "snapshot") {
      this.authed = true;
      this.delay = 200; // a session that got in resets the backoff
      this.h.onState("live");
      this.h.onSnapshot(msg);
      return;
    }
    if ((msg.type === "ok" || msg.type === "error") && msg.id !== null && this.pending.has(String(msg.id))) {
      const { resolve, reject, timer } = this.pending.get(String(msg.id));
      this.pending.delete(String(msg.id));
      clearTimeout(timer);
      if (msg.type === "ok") resolve(msg);
      else reject(new CommandError(msg));
      return;
    }
    this.h.onEvent(msg);
  }

  _retry(why) {
    const wait = Math.min(5000, this.delay) * (0.75 + Math.random() * 0.5);
    this.delay = Math.min(5000, this.delay * 2);
    this.h.onState("retrying", why);
    this.timer = setTimeout(() => this._open(), wait);
  }

  _failPending(why) {
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(new CommandError({ error: why, code: "offline" }));
    }
    this.pending.clear();
  }
}

// ws:// or wss:// URL of the page's own node (wss when the page came over https, e.g. through
// the TLS proxy).
export function socketUrl(location) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/`;
}
