// What ingests stored: the newest items, a full-text search, and one item whole with the
// matched passage highlighted. An item opens from a hit or from #content=<id>.

import { api, errorText } from "./api.js";
import { $, auditLink, h } from "./dom.js";

// The hit an item was opened from, so that its passage is highlighted.
let opened = null;

function clockOf(seconds) {
  const whole = Math.floor(seconds);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const rest = String(whole % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${rest}` : `${minutes}:${rest}`;
}

// Entities decoded as text: a textarea's content is never markup, and keeps its blanks.
const decoder = document.createElement("textarea");
function decode(escaped) {
  decoder.innerHTML = escaped;
  return decoder.value;
}

// A snippet as nodes: the service escapes the text and marks the matched words with
// <mark>; nothing else in it is taken as markup.
function snippetNodes(snippet) {
  const nodes = [];
  let marked = false;
  for (const part of snippet.split(/(<mark>|<\/mark>)/)) {
    if (part === "<mark>") marked = true;
    else if (part === "</mark>") marked = false;
    else if (part) nodes.push(marked ? h("mark", { text: decode(part) }) : decode(part));
  }
  return nodes;
}

const plainSnippet = (snippet) => decode(snippet.replace(/<\/?mark>/g, "")).replace(/^…|…$/g, "");

function itemLink(id, label) {
  const link = h("a", { href: `#content=${encodeURIComponent(id)}`, class: "content-open", text: label });
  // The same item again changes no hash, so no hashchange: open it here.
  link.addEventListener("click", () => {
    if (location.hash === link.getAttribute("href")) queueMicrotask(routeContent);
  });
  return link;
}

function listRow(item) {
  return h(
    "li",
    { class: "row", dataset: { id: item.id } },
    h("div", { class: "row-main" }, h("span", { class: "badge", text: item.type }), itemLink(item.id, item.title || item.id)),
    h(
      "p",
      { class: "row-sub" },
      [item.channel || item.author, item.ingested_at && new Date(item.ingested_at).toLocaleString([], { hourCycle: "h23" })]
        .filter(Boolean)
        .join(" · "),
    ),
    item.tags.length ? h("p", { class: "tags" }, ...item.tags.slice(0, 6).map((tag) => h("span", { class: "tag", text: tag }))) : null,
  );
}

function hitRow(hit) {
  const link = itemLink(hit.id, hit.title || hit.id);
  link.addEventListener("click", () => {
    opened = hit;
  });
  return h(
    "li",
    { class: "row hit", dataset: { id: hit.id } },
    h("div", { class: "row-main" }, h("span", { class: "badge", text: hit.type }), link),
    h("p", { class: "snippet" }, ...snippetNodes(hit.snippet)),
    hit.segment
      ? h(
          "p",
          { class: "row-sub" },
          h("a", { href: hit.segment.url, class: "watch", target: "_blank", rel: "noopener", text: `Watch at ${clockOf(hit.segment.start)}` }),
        )
      : null,
  );
}

async function fill(path, render, emptyText) {
  const list = $("content-list");
  const status = $("content-status");
  status.textContent = "Loading…";
  try {
    const response = await api(path);
    if (!response.ok) {
      list.replaceChildren();
      status.textContent = await errorText(response);
      status.classList.add("error");
      return;
    }
    status.classList.remove("error");
    const rows = render(await response.json());
    list.replaceChildren(...rows);
    status.textContent = rows.length ? "" : emptyText;
  } catch (error) {
    status.textContent = `Could not load content: ${error.message || error}`;
  }
}

export function searchContent(event) {
  event?.preventDefault();
  const query = $("content-query").value.trim();
  const type = $("content-type").value;
  const params = new URLSearchParams();
  if (type) params.set("type", type);
  if (!query) {
    fill(`/content?${params}&limit=20`, (page) => page.items.map(listRow), "Nothing has been stored yet.");
    return;
  }
  params.set("q", query);
  fill(`/content/search?${params}`, (found) => found.hits.map(hitRow), `Nothing matches “${query}”.`);
}

function factsOf(item) {
  const when = (value) => value && new Date(value).toLocaleString([], { hourCycle: "h23" });
  return [
    ["Type", item.type],
    ["Channel", item.type === "video" ? item.channel : null],
    ["Author", item.author],
    ["Published", item.published],
    ["Ingested", when(item.ingested_at)],
    ["Language", item.language],
  ].filter(([, value]) => value);
}

function transcript(item, hit) {
  const matched = hit?.segment ? hit.segment.start : null;
  return h(
    "ol",
    { class: "segments", "aria-label": "Transcript" },
    ...item.segments.map((segment) => {
      const here = segment.start === matched;
      return h(
        "li",
        { class: here ? "segment matched" : "segment", dataset: { start: segment.start } },
        h("a", { href: segment.url, target: "_blank", rel: "noopener", class: "at", text: clockOf(segment.start) }),
        " ",
        here ? h("mark", { class: "passage", text: segment.text }) : segment.text,
      );
    }),
  );
}

function articleText(item, hit) {
  const text = item.text || "";
  const passage = hit ? plainSnippet(hit.snippet).trim() : "";
  const at = passage ? text.indexOf(passage) : -1;
  if (at < 0) return h("div", { class: "text" }, text);
  return h(
    "div",
    { class: "text" },
    text.slice(0, at),
    h("mark", { class: "passage", text: passage }),
    text.slice(at + passage.length),
  );
}

function renderItem(item, hit) {
  const body = item.segments
    ? transcript(item, hit)
    : item.videos
      ? h("ul", { class: "videos" }, ...item.videos.map((video) => h("li", {}, video.id ? itemLink(video.id, video.title || video.video_id) : video.title || video.video_id)))
      : articleText(item, hit);
  return [
    h("h3", { text: item.title || item.id }),
    item.url ? h("p", { class: "row-sub" }, h("a", { href: item.url, target: "_blank", rel: "noopener", text: item.url })) : null,
    h("dl", { class: "facts" }, ...factsOf(item).flatMap(([name, value]) => [h("dt", { text: name }), h("dd", { text: value })])),
    item.tags.length ? h("p", { class: "tags", "aria-label": "Tags" }, ...item.tags.map((tag) => h("span", { class: "tag", text: tag }))) : null,
    item.summary ? h("div", { class: "summary" }, h("h4", { text: "Summary" }), h("p", { text: item.summary })) : null,
    h(
      "p",
      { class: "origin" },
      item.ingest_id ? auditLink(item.ingest_id, "Timeline of its ingest") : null,
      ...item.agent_runs.map((run) => h("span", { class: "run", text: ` · ${run.agent}: ${run.source_id}` })),
    ),
    body,
  ];
}

async function showItem(id) {
  const view = $("content-item");
  view.hidden = false;
  view.replaceChildren(h("p", { class: "hint", text: "Loading…" }));
  const hit = opened && opened.id === id ? opened : null;
  try {
    const response = await api(`/content/${encodeURIComponent(id)}`);
    if (!response.ok) {
      const text = response.status === 404 ? `There is no content ${id}.` : await errorText(response);
      view.replaceChildren(h("p", { class: "error", text }));
      return;
    }
    const item = await response.json();
    view.dataset.id = item.id;
    view.replaceChildren(...renderItem(item, hit).filter(Boolean));
    view.querySelector(".passage")?.scrollIntoView({ block: "center" });
  } catch (error) {
    view.replaceChildren(h("p", { class: "error", text: `Could not load ${id}: ${error.message || error}` }));
  }
}

export function routeContent() {
  const match = /^#content=(.+)$/.exec(location.hash);
  if (match) showItem(decodeURIComponent(match[1]));
}

export function startContent() {
  $("content-form").addEventListener("submit", searchContent);
  window.addEventListener("hashchange", routeContent);
  window.addEventListener("activity-token", () => searchContent());
  searchContent();
  routeContent();
}
