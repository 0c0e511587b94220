// Agent activities: the projection's rows from /agents, then every later event from
// /agents/stream folded in.

import { api } from "./api.js";
import { $, badge, h } from "./dom.js";
import { SseStream } from "./sse.js";

const AGENT_LIMIT = 50;

const agents = new Map();

// The same fold as the server's agent projection, applied to live envelopes.
function foldAgent(envelope) {
  const payload = envelope.payload || {};
  const row = agents.get(envelope.source_id) || {
    source_id: envelope.source_id,
    agent_name: "",
    status: "running",
    message: "",
    progress: null,
    started_at: envelope.timestamp,
    position: 0,
  };
  if (envelope.position <= row.position) return;
  if (typeof payload.agent_name === "string") row.agent_name = payload.agent_name;
  if (typeof payload.message === "string") row.message = payload.message;
  if (typeof payload.progress === "number") row.progress = payload.progress;
  const status = typeof payload.status === "string" ? payload.status : null;
  switch (envelope.event) {
    case "started":
      row.status = status || "running";
      row.started_at = envelope.timestamp;
      break;
    case "progress":
      row.status = status || "running";
      break;
    case "heartbeat":
      if (row.status === "stalled") row.status = status || "running";
      else if (status) row.status = status;
      break;
    case "complete":
      row.status = "completed";
      if (typeof payload.progress !== "number") row.progress = 1;
      break;
    case "failed":
      row.status = "failed";
      if (typeof payload.error === "string" && !payload.message) row.message = payload.error;
      break;
    case "stalled":
      row.status = "stalled";
      break;
    default:
      break;
  }
  row.position = envelope.position;
  if (envelope.event === "stalled") {
    row.stalled_at = envelope.timestamp;
    row.last_seen ??= envelope.timestamp;
  } else {
    row.last_seen = envelope.timestamp;
    row.stalled_at = null;
  }
  agents.set(row.source_id, row);
}

const AGENT_ORDER = { stalled: 0, running: 1, pending: 2 };

function renderAgents() {
  const rows = [...agents.values()].sort(
    (a, b) => (AGENT_ORDER[a.status] ?? 3) - (AGENT_ORDER[b.status] ?? 3) || b.position - a.position,
  );
  $("agents-empty").hidden = rows.length > 0;
  $("agent-list").replaceChildren(
    ...rows.slice(0, AGENT_LIMIT).map((row) => {
      const percent = row.progress === null || row.progress === undefined ? null : Math.round(row.progress * 100);
      const label = `${row.agent_name || "agent"} progress`;
      return h(
        "li",
        { class: `row agent status-row-${row.status}`, dataset: { source: row.source_id, status: row.status } },
        h(
          "div",
          { class: "row-main" },
          h("strong", { class: "agent-name", text: row.agent_name || "agent" }),
          " ",
          badge(row.status),
          row.status === "stalled"
            ? h("span", { class: "stalled-flag", text: "⚠ Stalled: no word from this agent" })
            : null,
        ),
        h(
          "div",
          { class: "bar" },
          h("progress", {
            max: "100",
            value: percent === null ? null : String(percent),
            "aria-label": label,
            "aria-valuetext": percent === null ? "progress unknown" : `${percent}%`,
          }),
          h("span", { class: "percent", text: percent === null ? "–" : `${percent}%` }),
        ),
        row.message ? h("p", { class: "message", text: row.message }) : null,
        h("p", { class: "row-sub source-id", text: row.source_id }),
      );
    }),
  );
}

let agentsPending = false;
function scheduleAgents() {
  if (agentsPending) return;
  agentsPending = true;
  requestAnimationFrame(() => {
    agentsPending = false;
    renderAgents();
  });
}

export async function startAgents() {
  let after = 0;
  try {
    const response = await api(`/agents?limit=${AGENT_LIMIT}`);
    if (response.ok) {
      for (const row of await response.json()) {
        agents.set(row.source_id, row);
        after = Math.max(after, row.position);
      }
    }
  } catch {
    // the stream below retries; the list fills in from it
  }
  renderAgents();
  // Every row is folded up to its own position, and no agent event lies between a row's
  // position and the newest one: resuming after the newest is exact.
  new SseStream({
    path: () => "/agents/stream",
    lastId: after,
    onEvent: (type, data, id) => {
      if (id === null) return;
      foldAgent(data);
      scheduleAgents();
    },
  }).start();
}
