// Headline numbers, running ingests and recent results, from /stats/stream.

import { $, auditLink, badge, between, clock, duration, fmt, h, humanize } from "./dom.js";
import { offerStreams } from "./log.js";
import { SseStream } from "./sse.js";

function renderStats(stats) {
  const ingests = stats.ingests;
  const by = ingests.by_status;
  const active = (by.pending || 0) + (by.running || 0) + (by.interrupted || 0);
  $("stat-processing").textContent = fmt(stats.processing_count);
  $("stat-processing-detail").textContent =
    `${fmt(active)} ingest${active === 1 ? "" : "s"}, ${fmt(stats.agents.running)} agent run${stats.agents.running === 1 ? "" : "s"}`;
  $("stat-ingests").textContent = fmt(ingests.total);
  $("stat-ingests-detail").textContent =
    `${fmt((by.success || 0) + (by.skipped || 0) + (by.queued || 0))} done · ` +
    `${fmt(by.error || 0)} failed · ${fmt(active)} running`;
  $("stat-agents").textContent = fmt(stats.agents.running);
  $("stat-agents-detail").textContent =
    `${fmt(stats.agents.total)} in all · ${fmt(stats.agents.finished)} finished`;
  $("stat-stalled").textContent = fmt(stats.agents.stalled);
  $("tile-stalled").classList.toggle("warn", stats.agents.stalled > 0);
  $("stat-events").textContent = fmt(stats.events.total);
  $("stat-events-detail").textContent = `head at position ${fmt(stats.events.head)}`;
  renderActive(stats.active_ingests);
  renderRecent(stats.recent);
  offerStreams(Object.keys(stats.events.by_stream || {}));
}

function renderActive(rows) {
  $("active-empty").hidden = rows.length > 0;
  $("active-list").replaceChildren(
    ...rows.map((row) =>
      h(
        "li",
        { class: "row", dataset: { ingest: row.ingest_id } },
        h("div", { class: "row-main" }, badge(row.status), " ", auditLink(row.ingest_id, row.url)),
        h(
          "div",
          { class: "row-sub" },
          `${row.type} · `,
          row.step ? h("span", { class: "step-now", text: humanize(row.step) }) : "waiting to start",
          " · ",
          h("span", {
            class: "elapsed",
            dataset: { since: row.started_at || row.requested_at },
            text: duration(Date.now() - Date.parse(row.started_at || row.requested_at)),
          }),
        ),
        row.message ? h("p", { class: "message", text: row.message }) : null,
      ),
    ),
  );
}

function renderRecent(items) {
  $("recent-empty").hidden = items.length > 0;
  $("recent-list").replaceChildren(
    ...items.map((item) => {
      const took = item.started_at ? ` · took ${duration(between(item.started_at, item.completed_at))}` : "";
      const main =
        item.kind === "ingest"
          ? auditLink(item.source_id, item.title || item.url || item.source_id)
          : h("strong", { text: item.label || item.source_id });
      const what = item.kind === "ingest" ? `${item.label} ingest` : "agent run";
      return h(
        "li",
        { class: "row", dataset: { kind: item.kind, source: item.source_id } },
        h("div", { class: "row-main" }, badge(item.status), " ", main),
        h("div", { class: "row-sub" }, `${what} · finished ${clock(item.completed_at)}${took}`),
        item.message ? h("p", { class: "message", text: item.message }) : null,
      );
    }),
  );
}

export function tickElapsed() {
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = duration(Date.now() - Date.parse(node.dataset.since));
  }
}

export function startStats() {
  new SseStream({
    path: () => "/stats/stream",
    strict: false,
    onEvent: (type, data) => {
      if (type === "stats") renderStats(data);
    },
  }).start();
}
