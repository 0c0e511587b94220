// The audit of one ingest: its whole timeline from the log, with the time spent per step.

import { api, errorText } from "./api.js";
import { $, between, clock, duration, h, humanize } from "./dom.js";

async function showAudit(ingestId) {
  const view = $("audit-view");
  $("audit-id").value = ingestId;
  view.replaceChildren(h("p", { class: "hint", text: "Loading…" }));
  try {
    const response = await api(`/ingests/${encodeURIComponent(ingestId)}`);
    if (response.status === 404) {
      view.replaceChildren(h("p", { class: "error", text: `There is no ingest with id ${ingestId}.` }));
      return;
    }
    if (!response.ok) {
      view.replaceChildren(h("p", { class: "error", text: await errorText(response) }));
      return;
    }
    const row = await response.json();
    const events = [];
    for (let after = 0; ; ) {
      const page = await api(`/ingests/${encodeURIComponent(ingestId)}/events?after=${after}&limit=1000`);
      if (!page.ok) throw new Error(await errorText(page));
      const body = await page.json();
      events.push(...body.events);
      if (body.events.length < 1000) break;
      after = body.next_after;
    }
    view.replaceChildren(renderAudit(row, events));
  } catch (error) {
    view.replaceChildren(
      h("p", { class: "error", text: `Could not load the timeline: ${error.message || error}` }),
    );
  }
}

function renderAudit(row, events) {
  const first = events[0]?.timestamp;
  const last = row.completed_at || events.at(-1)?.timestamp;
  const total = first && last ? duration(between(first, last)) : "–";
  const facts = [
    ["URL", row.url],
    ["Type", row.type],
    ["Status", row.status],
    ["Requested", first ? new Date(first).toLocaleString([], { hourCycle: "h23" }) : "–"],
    ["Finished", row.completed_at ? new Date(row.completed_at).toLocaleString([], { hourCycle: "h23" }) : "not yet"],
    ["Total time", total],
  ];
  const rows = events.map((event, index) => {
    const next = events[index + 1];
    const spent = next
      ? duration(between(event.timestamp, next.timestamp))
      : event.event === "complete"
        ? "–"
        : `${duration(Date.now() - Date.parse(event.timestamp))} so far`;
    const p = event.payload || {};
    return h(
      "tr",
      { dataset: { position: event.position, event: event.event } },
      h("td", { class: "num", text: event.position }),
      h("td", {}, h("time", { datetime: event.timestamp, text: clock(event.timestamp) })),
      h("td", { class: "num", text: `+${duration(between(first, event.timestamp))}` }),
      h("td", { text: event.event }),
      h("td", { text: humanize(p.step || (event.event === "complete" ? p.status : "")) }),
      h("td", { class: "details", text: p.message || "" }),
      h("td", { class: "num spent", text: spent }),
    );
  });
  return h(
    "div",
    { class: "audit-body", dataset: { ingest: row.ingest_id } },
    h("dl", { class: "facts" }, ...facts.flatMap(([name, value]) => [h("dt", { text: name }), h("dd", { text: value })])),
    h(
      "div",
      { class: "table-wrap", tabindex: "0", "aria-label": "Timeline" },
      h(
        "table",
        { class: "log timeline" },
        h("caption", { class: "visually-hidden", text: `Timeline of ingest ${row.ingest_id}` }),
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["#", "Time", "Since start", "Event", "Step", "Message", "Time spent"].map((name) =>
              h("th", { scope: "col", text: name }),
            ),
          ),
        ),
        h("tbody", {}, ...rows),
      ),
    ),
  );
}

export function openAudit(ingestId) {
  if (!ingestId) return;
  const hash = `#audit=${encodeURIComponent(ingestId)}`;
  if (location.hash === hash) routeHash();
  else location.hash = hash;
}

export function routeHash() {
  const match = /^#audit=(.+)$/.exec(location.hash);
  if (!match) return;
  showAudit(decodeURIComponent(match[1]));
  const heading = $("audit-heading");
  heading.setAttribute("tabindex", "-1");
  heading.scrollIntoView({ block: "start" });
  heading.focus({ preventScroll: true });
}
