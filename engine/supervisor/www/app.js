// The supervisor dashboard: login, the live board, and the actions on a call.
//
// The token is typed into the login form and kept in sessionStorage (this tab only, this origin
// only; gone when the tab closes); it never goes into a URL or a cookie. Logging out clears it
// and reloads the page. A monitor token gets a read-only page: every element marked
// data-operator is removed once the snapshot says the role (the server refuses their actions
// anyway). Taking a call over captures the browser's microphone and sends it as operator audio
// while the push-to-talk key (Space, or the on-screen button) is held, or all the time in
// "always on" mode. After a reconnect the page listens again to what it listened to, but never
// takes a call over again by itself: the server handed it back when the socket dropped.

import { CommandError, Connection, packAudio, socketUrl } from "./connection.js";
import { State, maskCaller } from "./state.js";
import { CallsTable, Feed, levelFraction, modeText, renderSpark, renderSystem, setLevel } from "./view.js";
import { Listener, Microphone } from "./audio.js";

const TOKEN_KEY = "xswarm.token";
const NAME_KEY = "xswarm.name";
const RENDER_INTERVAL_MS = 250; // samples arrive at most 4 times a second per call
const SAMPLED = new Set(["LatencySampled", "TickSampled", "SystemSampled", "TranscriptAppended"]); // drawn at that pace

const $ = (id) => document.getElementById(id);
const state = new State();
const table = new CallsTable($("calls").tBodies[0], $("no-calls"), $("calls-count"), select);
const feed = new Feed($("feed"));
const listener = new Listener();
const mic = new Microphone(onMicFrame);

let conn = null;
let selected = null; // the call in the detail panel
let listening = null; // the call this page listens to
let held = null; // the call this page has taken over
let handingBack = null; // the call this page is handing back (its CallUpdated comes before the answer)
let micSeq = 0;
let pttDown = false;
let renderTimer = null;
let renderUrgent = false;
let lastDelayShown = 0;
let errorTimer = null;

const now = () => Date.now() / 1000 + (state.serverSkew || 0);

// ------------------------------------------------------------------------------ login / out

function showLogin(message) {
  $("app-view").hidden = true;
  $("logout").hidden = true;
  $("link").hidden = true;
  $("who").textContent = "";
  $("node").textContent = "";
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
  $("login").elements.token.focus();
}

function startSession(token, name) {
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  $("logout").hidden = false;
  conn = new Connection(socketUrl(window.location), token, name, { onSnapshot, onEvent, onAudio, onState, onRefused });
  conn.start();
}

function endSession() {
  if (conn) conn.close();
  conn = null;
  mic.stop();
  listener.stop();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const token = form.elements.token.value.trim();
  const name = form.elements.name.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  if (name) sessionStorage.setItem(NAME_KEY, name);
  form.reset();
  startSession(token, name);
});

$("logout").addEventListener("click", () => {
  endSession();
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(NAME_KEY);
  window.location.reload(); // a clean page: no state, no audio, no role-specific markup left
});

// ---------------------------------------------------------------------------- the socket

function onState(kind, why) {
  const link = $("link");
  link.hidden = kind === "live";
  link.textContent = kind === "retrying" ? "disconnected, retrying" : "connecting…";
  link.title = why || "";
  link.dataset.state = kind;
  if (kind === "retrying") {
    if (held) dropTakeover("the connection dropped: the node handed the call back to the AI");
    listener.stop();
    renderDetail();
  }
}

function onRefused(reason) {
  endSession();
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(reason);
}

function onSnapshot(snap) {
  const monitor = snap.you.role !== "operator";
  if (!monitor && document.body.classList.contains("monitor")) {
    window.location.reload(); // a monitor's page lost the operator's controls: start afresh (the token is kept)
    return;
  }
  state.loadSnapshot(snap);
  document.body.classList.toggle("monitor", monitor);
  if (monitor) document.querySelectorAll("[data-operator]").forEach((node) => node.remove());
  $("who").textContent = `${snap.you.actor} · ${state.role}`;
  $("node").textContent = snap.node && snap.node.id ? `node ${snap.node.id}` : "";
  if (listening && state.calls.has(listening)) {
    const callId = listening;
    listener.start(callId);
    conn.command("Listen", { call_id: callId, codec: "pcm16" }).catch(() => stopListening());
  } else if (listening) {
    stopListening();
  }
  render(true);
}

function onEvent(msg) {
  if (msg.type === "error") {
    showError(`node: ${msg.error}${msg.code ? ` (${msg.code})` : ""}`); // e.g. bad_audio, which answers no command
    return;
  }
  state.apply(msg);
  const urgent = !SAMPLED.has(msg.type);
  if (msg.type === "CallEnded") {
    if (msg.call_id === listening) stopListening();
    if (msg.call_id === held) dropTakeover("");
  } else if (msg.type === "CallUpdated" && msg.call_id === held) {
    if (msg.mode !== "operator" || msg.operator !== state.you.actor) {
      dropTakeover(handingBack === held ? "" : "the call went back to the AI");
    }
  }
  scheduleRender(urgent);
}

function onAudio(frame) {
  listener.push(frame);
}

// ------------------------------------------------------------------------------ rendering

function scheduleRender(urgent) {
  if (renderTimer !== null && (!urgent || renderUrgent)) return;
  clearTimeout(renderTimer);
  renderUrgent = urgent;
  renderTimer = setTimeout(() => render(false), urgent ? 0 : RENDER_INTERVAL_MS);
}

function render(all) {
  clearTimeout(renderTimer);
  renderTimer = null;
  if (all || state.dirty.has("calls")) {
    table.render(state, all ? null : new Set(state.changed), now());
    state.changed.clear();
    const node = state.node && state.node.id ? ` · ${state.node.id}` : "";
    document.title = `xswarm${node} · ${state.calls.size} call${state.calls.size === 1 ? "" : "s"}`; // tells tabs apart
  }
  if (all || state.dirty.has("calls") || state.dirty.has("detail")) renderDetail();
  if (all || state.dirty.has("feed")) feed.render(state);
  if (all || state.dirty.has("system")) {
    renderSystem($("system"), state);
    renderNodeActions();
    renderSpark($("spark"), state.tickHistory);
  }
  state.dirty.clear();
}

setInterval(() => table.tickDurations(state, now()), 1000);

function select(callId) {
  selected = callId;
  table.select(callId);
  showError("");
  renderDetail();
  if (window.matchMedia("(max-width: 800px)").matches) $("detail").scrollIntoView({ block: "nearest" });
}

function show(action, visible) {
  const button = document.querySelector(`#detail [data-action="${action}"]`);
  if (button) button.hidden = !visible;
}

function renderDetail() {
  const panel = $("detail");
  const call = selected ? state.calls.get(selected) : null;
  panel.hidden = !call;
  if (!call) return;
  const mine = held === call.id;
  $("detail-sid").textContent = call.id;
  const mode = $("detail-mode");
  mode.textContent = modeText(call);
  mode.className = `mode ${call.mode}`;
  const who = call.source === "local" ? "local microphone" : table.reveal ? call.caller || "—" : maskCaller(call.caller);
  const info = [who, call.userId ? `user ${call.userId}` : "unknown user", call.theme ? `persona ${call.theme}` : null];
  if (call.mode === "operator" && !mine) info.push(`taken over by ${call.operator}`);
  if (call.dtmf) info.push(`DTMF ${call.dtmf}`);
  if (call.actions.length) info.push(`last action: ${call.actions[call.actions.length - 1]}`);
  $("detail-info").textContent = info.filter(Boolean).join(" · ");
  const transcript = $("detail-transcript");
  transcript.hidden = !call.transcript;
  if (transcript.textContent !== call.transcript) transcript.textContent = call.transcript;
  show("listen", listening !== call.id);
  show("unlisten", listening === call.id);
  show("mute", call.mode === "ai");
  show("unmute", call.mode === "muted");
  show("takeover", call.mode !== "operator");
  show("handback", mine);
  $("listening").hidden = listening !== call.id;
  const talk = $("talk");
  if (talk) talk.hidden = !mine;
}

// ------------------------------------------------------------------------------- actions

// Errors go to one place at the bottom of the screen, wherever the operator has scrolled to.
function showError(message) {
  const toast = $("toast");
  toast.textContent = message;
  toast.hidden = !message;
  clearTimeout(errorTimer);
  if (message) errorTimer = setTimeout(() => (toast.hidden = true), 8000);
}

async function act(type, callId, fields = {}) {
  try {
    return await conn.command(type, { call_id: callId, ...fields });
  } catch (err) {
    showError(err instanceof CommandError && err.code ? `${type}: ${err.message} (${err.code})` : `${type}: ${err.message}`);
    throw err;
  }
}

// Resolves true or false; with `askNumber`, the typed number ("" for none) instead of true.
function confirmAction(text, askNumber = false) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  const numberField = $("confirm-to");
  numberField.hidden = !askNumber;
  numberField.querySelector("input").value = "";
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-ok").onclick = () => done(askNumber ? numberField.querySelector("input").value.trim() : true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.onclose = () => done(false); // Escape
    dialog.showModal();
  });
}

function stopListening() {
  listening = null;
  listener.stop();
  renderDetail();
}

function dropTakeover(message) {
  held = null;
  pttDown = false;
  mic.stop();
  if (message) showError(message);
  renderDetail();
}

const ACTIONS = {
  async listen(id) {
    const previous = listening;
    listener.start(id); // inside the click: the browser lets this audio context play
    if (previous && previous !== id) act("Unlisten", previous).catch(() => {});
    listening = id;
    renderDetail();
    await act("Listen", id, { codec: "pcm16" }).catch(() => stopListening());
  },
  async unlisten(id) {
    stopListening();
    await act("Unlisten", id).catch(() => {});
  },
  mute: (id) => act("Mute", id),
  unmute: (id) => act("Unmute", id),
  async takeover(id) {
    try {
      await mic.start(); // ask for the microphone before taking the call from the AI
    } catch (err) {
      showError(`microphone: ${err.message}`);
      return;
    }
    try {
      await act("TakeOver", id);
    } catch {
      mic.stop();
      return;
    }
    held = id;
    micSeq = 0;
    renderDetail();
  },
  async handback(id) {
    handingBack = id;
    try {
      await act("HandBack", id);
      dropTakeover("");
    } catch {
      // refused (e.g. the call had ended): the events say what the call's state is now
    } finally {
      handingBack = null;
    }
  },
  async hangup(id) {
    if (await confirmAction(`Hang up call ${id}? The caller is disconnected.`)) await act("HangUp", id).catch(() => {});
  },
  async transfer(id) {
    const to = await confirmAction(`Transfer call ${id}? The AI leaves the call.`, true);
    if (to === false) return;
    await act("Transfer", id, to ? { to } : {}).catch(() => {});
  },
};

$("detail").addEventListener("click", (ev) => {
  const button = ev.target.closest("button[data-action]");
  if (!button || !selected || !(button.dataset.action in ACTIONS)) return;
  ACTIONS[button.dataset.action](selected).catch(() => {});
});

const whisper = $("whisper");
whisper.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = whisper.elements.text;
  const text = input.value.trim();
  if (!text || !selected) return;
  act("Whisper", selected, { text })
    .then(() => (input.value = ""))
    .catch(() => {});
});

$("reveal").addEventListener("change", (ev) => {
  table.reveal = ev.target.checked;
  table.render(state, null, now());
  renderDetail();
});

// ------------------------------------------------------------------- draining this node

function renderNodeActions() {
  const drain = $("drain");
  const resume = $("resume");
  if (!drain || !resume) return; // a monitor's page has neither
  drain.hidden = state.nodeState !== "ready";
  resume.hidden = state.nodeState !== "draining";
}

async function nodeCommand(type) {
  try {
    await conn.command(type);
  } catch (err) {
    showError(`${type}: ${err.message}${err.code ? ` (${err.code})` : ""}`);
  }
}

$("drain").addEventListener("click", async () => {
  const text = "Drain this node? It takes no new calls; the live ones finish. Resume to take calls again.";
  if (await confirmAction(text)) await nodeCommand("DrainNode");
});
$("resume").addEventListener("click", () => nodeCommand("ResumeNode"));

// ---------------------------------------------------------------------- talking (takeover)

function talking() {
  return held !== null && ($("always-on").checked || pttDown);
}

function onMicFrame(pcm, rms) {
  setLevel($("mic-level"), levelFraction(rms));
  const live = talking();
  const label = $("mic-state");
  const text = live ? "ON AIR" : "mic ready: hold Space or the button to talk";
  if (label.textContent !== text) {
    label.textContent = text;
    label.classList.toggle("on", live);
  }
  if (live && conn) conn.sendBinary(packAudio(held, micSeq++, pcm));
}

function typing(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement;
}

document.addEventListener("keydown", (ev) => {
  if (ev.code === "Space" && held && !typing(ev.target)) {
    ev.preventDefault();
    pttDown = true;
  }
});
document.addEventListener("keyup", (ev) => {
  if (ev.code === "Space" && !typing(ev.target)) {
    if (held) ev.preventDefault(); // a focused button must not be clicked by the talk key
    pttDown = false;
  }
});
window.addEventListener("blur", () => (pttDown = false));
const ptt = $("ptt");
ptt.addEventListener("pointerdown", () => (pttDown = true));
for (const kind of ["pointerup", "pointerleave", "pointercancel"]) ptt.addEventListener(kind, () => (pttDown = false));
ptt.addEventListener("contextmenu", (ev) => ev.preventDefault()); // a long press on a phone is talking, not a menu

// ------------------------------------------------------------------------------ listening

document.addEventListener("xswarm-audio", (ev) => {
  const d = ev.detail;
  setLevel($(d.direction === "caller" ? "listen-caller" : "listen-ai"), levelFraction(d.rms));
  const t = Date.now();
  if (t - lastDelayShown > 500) {
    lastDelayShown = t;
    const behind = (d.playedAt + (state.serverSkew || 0) - d.capturedAt) * 1000;
    $("listen-delay").textContent = `${Math.max(0, Math.round(behind))} ms behind the node`;
  }
});

// ---------------------------------------------------------------------------------- start

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) startSession(saved, sessionStorage.getItem(NAME_KEY) || "");
else showLogin("");
