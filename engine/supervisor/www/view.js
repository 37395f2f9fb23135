// Drawing the state into the page. Everything from the node goes in as text (textContent), never
// as markup: callers' numbers, names and SMS summaries are outside input. Rows are keyed by call
// id and only the cells that changed are touched, so 50 calls at 4 samples a second each stay
// cheap. Meter levels are set through the CSSOM (element.style), which the page's CSP allows.

import { maskCaller, shortSid } from "./state.js";

export function duration(seconds) {
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mm = String(m).padStart(2, "0");
  const ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

export function ms(value) {
  return value == null ? "—" : `${Math.round(value)} ms`;
}

// RMS (0..1) to a meter position on a 60 dB scale, as the console's meters do.
export function levelFraction(rms) {
  if (!(rms > 1e-6)) return 0;
  return Math.min(1, Math.max(0, 1 + (20 * Math.log10(rms)) / 60));
}

function grade(value, warn, bad) {
  if (value == null) return "";
  return value < warn ? "good" : value < bad ? "warn" : "bad";
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function modeText(call) {
  const base = { ai: "AI", operator: `OPERATOR ${call.operator || ""}`.trim(), muted: "MUTED" }[call.mode] || call.mode;
  return call.listeners ? `${base} ◉${call.listeners}` : base;
}

const COLUMNS = {
  call: "Call",
  caller: "Caller",
  user: "User",
  persona: "Persona",
  duration: "Duration",
  mode: "Mode",
  bal: "BAL p50",
  lag: "Playout lag",
  late: "Late",
  levels: "Caller │ AI",
};

export class CallsTable {
  constructor(tbody, empty, count, onSelect) {
    this.tbody = tbody;
    this.empty = empty;
    this.count = count;
    this.rows = new Map(); // call id -> {tr, cells, shown}
    this.selected = null;
    this.reveal = false;
    tbody.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-call-sid]");
      if (tr) onSelect(tr.dataset.callSid);
    });
    tbody.addEventListener("keydown", (ev) => {
      const tr = ev.target.closest("tr[data-call-sid]");
      if (tr && ev.key === "Enter") onSelect(tr.dataset.callSid);
    });
  }

  select(id) {
    this.selected = id;
    for (const [cid, row] of this.rows) row.tr.classList.toggle("selected", cid === id);
  }

  // Bring rows in line with the state; `changed` limits the work to those calls (null: all).
  render(state, changed, now) {
    const ids = changed === null ? new Set([...state.calls.keys(), ...this.rows.keys()]) : changed;
    for (const id of ids) {
      const call = state.calls.get(id);
      const row = this.rows.get(id);
      if (!call) {
        if (row) {
          row.tr.remove();
          this.rows.delete(id);
        }
        continue;
      }
      this._draw(row || this._add(call), call, state, now);
    }
    this.empty.hidden = this.rows.size > 0;
    this.count.textContent = String(this.rows.size);
  }

  tickDurations(state, now) {
    for (const [id, row] of this.rows) {
      const call = state.calls.get(id);
      if (call) this._set(row, "duration", duration(now - call.startedAt));
    }
  }

  _add(call) {
    const tr = el("tr");
    tr.dataset.callSid = call.id;
    tr.title = call.id;
    tr.tabIndex = 0; // rows are reachable with Tab; Enter opens the call
    const cells = {};
    for (const [key, label] of Object.entries(COLUMNS)) {
      const td = el("td", `c-${key}`);
      td.dataset.label = label; // the phone layout shows it beside the value
      cells[key] = td;
      tr.append(td);
    }
    const levels = cells.levels;
    levels.append(el("span", "meter"), el("span", "meter"));
    levels.children[0].append(el("span", "fill caller"));
    levels.children[1].append(el("span", "fill ai"));
    // Rows stay in the order calls started (oldest first), as on the console's default sort.
    this.tbody.append(tr);
    const row = { tr, cells, shown: {} };
    this.rows.set(call.id, row);
    tr.classList.toggle("selected", call.id === this.selected);
    return row;
  }

  _draw(row, call, state, now) {
    const caller = call.source === "local" ? "local mic" : this.reveal ? call.caller || "—" : maskCaller(call.caller);
    const bal = state.balP50(call);
    const lag = state.lagP50(call);
    this._set(row, "call", shortSid(call.id));
    this._set(row, "caller", caller);
    this._set(row, "user", call.userId || "—");
    this._set(row, "persona", call.theme || "—");
    this._set(row, "duration", duration(now - call.startedAt));
    this._set(row, "mode", modeText(call), `c-mode mode ${call.mode}`);
    this._set(row, "bal", ms(bal), `c-bal ${grade(bal, 120, 250)}`);
    this._set(row, "lag", ms(lag), `c-lag ${grade(lag, 250, 500)}`);
    this._set(row, "late", String(call.lateFrames), call.lateFrames ? "c-late bad" : "c-late");
    row.tr.dataset.mode = call.mode;
    const fills = row.cells.levels.querySelectorAll(".fill");
    setLevel(fills[0], levelFraction(call.inLevel));
    setLevel(fills[1], levelFraction(call.outLevel));
  }

  _set(row, key, text, cls) {
    if (row.shown[key] !== text) {
      row.cells[key].textContent = text;
      row.shown[key] = text;
    }
    if (cls !== undefined && row.shown[`${key}.class`] !== cls) {
      row.cells[key].className = cls;
      row.shown[`${key}.class`] = cls;
    }
  }
}

// A meter's fill is scaled, not resized: a transform needs no layout of the table around it.
export function setLevel(node, fraction) {
  const scale = `scaleX(${(Math.round(fraction * 50) / 50).toFixed(2)})`;
  if (node.style.transform !== scale) node.style.transform = scale;
}

export class Feed {
  constructor(list) {
    this.list = list;
    this.last = 0;
  }

  render(state) {
    for (const item of state.feed) {
      if (item.seq <= this.last) continue;
      this.last = item.seq;
      const li = el("li", `feed-${item.category}`);
      li.append(el("time", "", new Date(item.at * 1000).toLocaleTimeString([], { hour12: false })));
      li.append(el("span", "kind", item.category));
      li.append(el("span", "text", item.text));
      this.list.prepend(li); // newest on top
    }
    while (this.list.children.length > state.feed.length) this.list.lastElementChild.remove();
  }

  clear() {
    this.list.replaceChildren();
    this.last = 0;
  }
}

function gib(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

function row(dl, label, value, cls) {
  dl.append(el("dt", "", label));
  dl.append(el("dd", cls || "", value));
}

export function renderSystem(dl, state) {
  dl.replaceChildren();
  const s = state.system;
  if (state.nodeState) row(dl, "Node", state.nodeState === "ready" ? "ready: takes calls" : `${state.nodeState}: no new calls`, state.nodeState === "ready" ? "" : "warn");
  if (state.model) {
    const m = state.model;
    const progress = m.state === "loading" && m.progress != null ? ` ${Math.round(m.progress * 100)}%` : "";
    row(dl, "Model", `${m.model} ${m.state}${progress}`, m.state === "failed" ? "bad" : "");
  }
  if (state.tick) {
    const t = state.tick;
    row(dl, "Slots", `${t.active} / ${t.slots} in use`);
    const share = (t.step_ms_p50 / 80) * 100;
    row(dl, "Step p50", `${t.step_ms_p50.toFixed(1)} ms (${share.toFixed(0)}% of 80 ms), max ${t.step_ms_max.toFixed(1)} ms`, grade(share, 60, 90));
    row(dl, "Missed ticks", String(t.missed_ticks), t.missed_ticks ? "warn" : "");
  } else if (state.slots && state.slots.total != null) {
    row(dl, "Slots", `${state.slots.used} / ${state.slots.total} in use`);
  }
  if (s) {
    row(dl, "CPU", `${s.cpu_percent.toFixed(0)} %`);
    row(dl, "RAM", `${gib(s.ram_used_bytes)} / ${gib(s.ram_total_bytes)} GiB`);
    if (Array.isArray(s.gpus) && s.gpus.length) {
      s.gpus.forEach((g, i) => {
        const parts = [];
        if (g.util_percent != null) parts.push(`${g.util_percent}%`);
        if (g.mem_used != null && g.mem_total) parts.push(`${gib(g.mem_used)} / ${gib(g.mem_total)} GiB`);
        if (g.temp_c != null) parts.push(`${g.temp_c} °C`);
        if (g.power_w != null) parts.push(`${Math.round(g.power_w)} W`);
        row(dl, `GPU ${i}`, `${g.name || "GPU"}: ${parts.join(" · ")}`);
      });
    } else {
      row(dl, "GPU", `No GPU${s.gpu_reason ? ": " + s.gpu_reason : ""}`, "muted");
    }
  }
}

// Step time p50 over the last two minutes, scaled to the 80 ms budget (the dashed line is 80 ms).
export function renderSpark(svg, history) {
  const line = svg.querySelector("polyline");
  const width = 240;
  const height = 40;
  const top = Math.max(80, ...history);
  const n = history.length;
  const pts = history.map((v, i) => {
    const x = n > 1 ? (i / (n - 1)) * width : width;
    const y = height - (v / top) * (height - 2) - 1;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  line.setAttribute("points", pts.join(" "));
  const budget = svg.querySelector("line");
  const y = (height - (80 / top) * (height - 2) - 1).toFixed(1);
  budget.setAttribute("y1", y);
  budget.setAttribute("y2", y);
}
