// The event log viewer: a tail of /events/stream, filtered by stream, source and event.

import { api } from "./api.js";
import { $, auditLink, clock, fmt, h, humanize } from "./dom.js";
import { SseStream, pause } from "./sse.js";

const LOG_BACKLOG = 200; // log positions replayed when the viewer opens
const LOG_KEEP = 300; // rows kept in the table

let logStream = null;
let logGeneration = 0;
const knownStreams = new Set();

export function offerStreams(names) {
  const select = $("log-stream");
  for (const name of names) {
    if (knownStreams.has(name)) continue;
    knownStreams.add(name);
    select.append(h("option", { value: name, text: name }));
  }
}

function summarize(envelope) {
  const p = envelope.payload || {};
  const parts = [];
  if (p.agent_name) parts.push(p.agent_name);
  if (p.step) parts.push(humanize(p.step));
  if (p.status) parts.push(p.status);
  if (typeof p.progress === "number") parts.push(`${Math.round(p.progress * 100)}%`);
  if (p.message) parts.push(p.message);
  else if (p.url) parts.push(p.url);
  return parts.join(" · ");
}

function addLogRow(envelope) {
  const rows = $("log-rows");
  const source =
    envelope.stream === "ingest"
      ? auditLink(envelope.source_id, envelope.source_id)
      : h("code", { text: envelope.source_id });
  rows.prepend(
    h(
      "tr",
      { dataset: { position: envelope.position, event: envelope.event, stream: envelope.stream } },
      h("td", { class: "num", text: envelope.position }),
      h("td", {}, h("time", { datetime: envelope.timestamp, text: clock(envelope.timestamp) })),
      h("td", { text: envelope.stream }),
      h("td", { class: "source" }, source),
      h("td", {}, h("span", { class: "event-name", text: envelope.event })),
      h("td", { class: "details", text: summarize(envelope) }),
    ),
  );
  while (rows.rows.length > LOG_KEEP) rows.deleteRow(rows.rows.length - 1);
}

// The log's head, once the service answers: a tail opened without it would replay the log
// from its very start.
async function readHead() {
  for (;;) {
    try {
      const response = await api("/events?limit=1");
      if (response.ok) return (await response.json()).head;
    } catch {
      // not reachable yet: try again
    }
    await pause(2000);
  }
}

export async function startLog(event) {
  event?.preventDefault();
  logStream?.stop();
  $("log-rows").replaceChildren();
  const query = new URLSearchParams();
  for (const [name, id] of [["stream", "log-stream"], ["source_id", "log-source"], ["event", "log-event"]]) {
    const value = $(id).value.trim();
    if (value) query.set(name, value);
  }
  const generation = ++logGeneration;
  const head = await readHead();
  if (generation !== logGeneration) return; // filters applied again meanwhile
  const start = Math.max(0, head - LOG_BACKLOG);
  $("log-status").textContent =
    `Following the log live from position ${fmt(start + 1)}` + (query.size ? " (filtered)." : ".");
  const suffix = query.size ? `?${query}` : "";
  logStream = new SseStream({
    path: () => `/events/stream${suffix}`,
    lastId: start,
    onEvent: (type, data, id) => {
      if (id !== null) addLogRow(data);
    },
    onEnd: (reason, status, detail) => {
      $("log-status").textContent = `The filters were not accepted: ${detail}`;
    },
  }).start();
}
