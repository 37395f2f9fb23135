// What the page shows, rebuilt from the snapshot and the event stream (the same rules as the
// console's xswarm_tui/state.py): live calls keyed by call id, the events feed, the latest
// system and tick figures and the step-time history. Events may repeat what a snapshot already
// holds, so every handler is idempotent by call id.

export const FEED_SIZE = 200;
export const HISTORY = 120; // TickSampled arrive once a second: two minutes of step time
const SAMPLES = 20; // latency samples kept per call for the p50 columns
const TRANSCRIPT_CHARS = 600; // the tail of the AI's words shown in a call's panel

export function maskCaller(number) {
  if (!number) return "—";
  if (number.length <= 4) return "•".repeat(number.length);
  const head = number.startsWith("+") ? 2 : 0;
  return number.slice(0, head) + "•".repeat(number.length - head - 3) + number.slice(-3);
}

// "CA0123…cdef": Twilio's 34-character CallSids, short enough for a table cell or a feed line.
export function shortSid(id) {
  return id && id.length > 16 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id || "";
}

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export class State {
  constructor() {
    this.reset();
  }

  reset() {
    this.calls = new Map();
    this.feed = [];
    this.feedSeq = 0;
    this.system = null;
    this.tick = null;
    this.tickHistory = [];
    this.model = null;
    this.nodeState = null; // this node: "ready" or "draining" (xswarm nodes drain|resume)
    this.slots = null;
    this.node = null;
    this.you = null;
    this.changed = new Set(); // call ids whose rows need drawing
    this.dirty = new Set(); // "calls", "feed", "system", "detail"
  }

  get role() {
    return this.you ? this.you.role : null;
  }

  loadSnapshot(snap) {
    const keepFeed = this.feed.length > 0; // a reconnect: the feed already holds these
    this.you = snap.you;
    this.node = snap.node || null;
    this.nodeState = (snap.node && snap.node.state) || null;
    this.slots = snap.slots || null;
    this.serverSkew = (snap.server_time || Date.now() / 1000) - Date.now() / 1000;
    if (snap.model && snap.model.state) {
      this.model = { model: snap.model.name || snap.model.spec || "?", state: snap.model.state, detail: snap.model.detail || "", progress: snap.model.progress };
    }
    if (snap.system) this.system = snap.system;
    const listed = new Set();
    for (const c of Array.isArray(snap.calls) ? snap.calls : []) {
      if (!c || typeof c.call_id !== "string") continue;
      listed.add(c.call_id);
      const call = this.calls.get(c.call_id) || this._newCall(c.call_id, c.source, c.caller, c.user_id, c.theme, c.started_at);
      call.mode = c.mode || "ai";
      call.operator = c.operator || null;
      call.listeners = c.listeners || 0;
      call.lateFrames = c.late_frames || 0;
      call.inLevel = c.in_level || 0;
      call.outLevel = c.out_level || 0;
      if (c.bal_ms && c.bal_ms.p50 != null && !call.bal.length) call.bal.push(c.bal_ms.p50);
      if (c.playout_lag_ms && c.playout_lag_ms.p50 != null && !call.lag.length) call.lag.push(c.playout_lag_ms.p50);
      this._touch(c.call_id);
    }
    for (const id of [...this.calls.keys()]) {
      if (!listed.has(id)) {
        this.calls.delete(id);
        this._touch(id);
      }
    }
    if (!keepFeed) {
      for (const wire of Array.isArray(snap.recent_events) ? snap.recent_events : []) {
        if (FEED_ONLY.has(wire.type)) this.apply(wire);
      }
    }
    this.dirty.add("system");
  }

  apply(e) {
    const handler = HANDLERS[e.type];
    if (handler) handler(this, e);
  }

  _newCall(id, source, caller, userId, theme, startedAt) {
    const call = {
      id,
      source: source || "twilio",
      caller: caller || null,
      userId: userId || null,
      theme: theme || null,
      startedAt: startedAt || Date.now() / 1000,
      mode: "ai",
      operator: null,
      listeners: 0,
      bal: [],
      lag: [],
      lateFrames: 0,
      inLevel: 0,
      outLevel: 0,
      actions: [],
      transcript: "", // the AI's words so far (the tail of it)
      dtmf: "",
    };
    this.calls.set(id, call);
    return call;
  }

  balP50(call) {
    return median(call.bal);
  }

  lagP50(call) {
    return median(call.lag);
  }

  _touch(id) {
    this.changed.add(id);
    this.dirty.add("calls");
  }

  _feed(at, category, text) {
    this.feed.push({ seq: ++this.feedSeq, at, category, text });
    if (this.feed.length > FEED_SIZE) this.feed.shift();
    this.dirty.add("feed");
  }
}

const HANDLERS = {
  CallStarted(s, e) {
    if (!s.calls.has(e.call_id)) s._newCall(e.call_id, e.source, e.caller, e.user_id, e.theme, e.at);
    s._touch(e.call_id);
    const who = e.source === "local" ? "local microphone" : maskCaller(e.caller);
    s._feed(e.at, "call", `call ${shortSid(e.call_id)} started (${who}, slot ${e.slot})`);
  },
  CallUpdated(s, e) {
    const call = s.calls.get(e.call_id);
    if (!call) return;
    call.mode = e.mode;
    call.operator = e.operator;
    call.listeners = e.listeners;
    s._touch(e.call_id);
  },
  CallEnded(s, e) {
    if (s.calls.delete(e.call_id)) s._touch(e.call_id);
    s._feed(e.at, "call", `call ${shortSid(e.call_id)} ended: ${e.reason} after ${Math.round(e.duration_s)} s`);
  },
  LatencySampled(s, e) {
    const call = s.calls.get(e.call_id);
    if (!call) return;
    if (e.bal_ms != null) push(call.bal, e.bal_ms, SAMPLES);
    if (e.playout_lag_ms != null) push(call.lag, e.playout_lag_ms, SAMPLES);
    call.lateFrames = e.late_frames;
    call.inLevel = e.in_level;
    call.outLevel = e.out_level;
    s._touch(e.call_id);
  },
  TickSampled(s, e) {
    s.tick = e;
    push(s.tickHistory, e.step_ms_p50, HISTORY);
    s.dirty.add("system");
  },
  SystemSampled(s, e) {
    s.system = e;
    s.dirty.add("system");
  },
  ModelStatusChanged(s, e) {
    s.model = e;
    s.dirty.add("system");
    if (e.progress == null || e.state !== "loading") {
      s._feed(e.at, e.state === "failed" ? "error" : "model", `model ${e.model} ${e.state}${e.detail ? ": " + e.detail : ""}`);
    }
  },
  SupervisorActed(s, e) {
    const line = `${e.actor}: ${e.action} → ${e.result}`;
    const call = s.calls.get(e.call_id || "");
    if (call) {
      push(call.actions, line, 20);
      s._touch(call.id);
    }
    s._feed(e.at, "supervisor", line + (e.call_id ? ` (${shortSid(e.call_id)})` : ""));
  },
  DtmfReceived(s, e) {
    const call = s.calls.get(e.call_id);
    if (call) {
      call.dtmf = (call.dtmf + e.digit).slice(-32);
      s._touch(e.call_id);
    }
    s._feed(e.at, "call", `DTMF ${e.digit} on ${shortSid(e.call_id)}`);
  },
  TranscriptAppended(s, e) {
    const call = s.calls.get(e.call_id);
    if (!call) return;
    call.transcript = (call.transcript + e.text).slice(-TRANSCRIPT_CHARS);
    s.dirty.add("detail"); // only the call's panel shows it: the table need not redraw
  },
  CallRefused(s, e) {
    s._feed(e.at, "call", `call refused: ${e.reason} ${e.detail}`.trim());
  },
  MessageReceived(s, e) {
    s._feed(e.at, e.channel === "voicemail" ? "sms" : e.channel, `${e.channel} from ${e.user_id || "unknown"}: ${e.summary}`);
  },
  PaymentStatusChanged(s, e) {
    s._feed(e.at, "payment", `payment ${e.status} for ${e.user_id || "unknown"}${e.tier ? ` (tier ${e.tier})` : ""}`);
  },
  WebhookReceived(s, e) {
    s._feed(e.at, "webhook", `${e.provider} ${e.event_type}: ${e.summary}`);
  },
  WebhookFailed(s, e) {
    s._feed(e.at, "error", `${e.provider} webhook ${e.event_id} ${e.dead ? "dead-lettered" : "failed"}: ${e.error}`);
  },
  UserCreated(s, e) {
    s._feed(e.at, "user", `new user ${e.name} (${e.tier})`);
  },
  NodeStateChanged(s, e) {
    if (s.node && e.node_id === s.node.id) {
      s.nodeState = e.state;
      s.dirty.add("system");
    }
    s._feed(e.at, e.state === "down" ? "error" : "node", `node ${e.node_id} ${e.state}${e.detail ? ": " + e.detail : ""}`);
  },
  ErrorRaised(s, e) {
    s._feed(e.at, "error", `${e.source}: ${e.message}`);
  },
};

const FEED_ONLY = new Set([
  "NodeStateChanged",
  "MessageReceived",
  "PaymentStatusChanged",
  "WebhookReceived",
  "WebhookFailed",
  "UserCreated",
  "ErrorRaised",
  "CallRefused",
  "SupervisorActed",
]);

function push(list, value, max) {
  list.push(value);
  if (list.length > max) list.shift();
}
