// The ingest form and the live steps of the ingest it started. The ingest's id is kept in
// sessionStorage, so a reload follows the same ingest again.

import { api, errorText } from "./api.js";
import { $, fmt, h, humanize } from "./dom.js";
import { SseStream } from "./sse.js";

const INGEST_KEY = "activity.ingest";

let following = null;

function showIngestError(text) {
  const node = $("ingest-error");
  node.textContent = text;
  node.hidden = !text;
  $("ingest-url").setAttribute("aria-invalid", text ? "true" : "false");
}

export async function submitIngest(event) {
  event.preventDefault();
  const url = $("ingest-url").value.trim();
  if (!url) return showIngestError("Enter the URL of a video, a channel or an article.");
  showIngestError("");
  const button = $("ingest-submit");
  button.disabled = true;
  try {
    const response = await api("/ingests", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ url, channel_limit: $("ingest-limit").value }),
    });
    if (!response.ok) {
      const detail = await errorText(response);
      if (response.status === 401) showIngestError("The service needs a valid access token.");
      else if (response.status < 500) showIngestError(`That URL was not accepted: ${detail}`);
      else showIngestError(`The service could not start the ingest (${detail}). Try again shortly.`);
      return;
    }
    const accepted = await response.json();
    followIngest(accepted.ingest_id, url, !accepted.created);
  } catch {
    showIngestError("Could not reach the service. Check the connection and try again.");
  } finally {
    button.disabled = false;
  }
}

function describeResult(result) {
  const details = result.details || {};
  const message = result.message || "";
  switch (result.status) {
    case "success":
      return { tone: "ok", title: "Done", text: message || "Stored." };
    case "skipped":
      return { tone: "ok", title: "Already stored", text: message || "Nothing to do." };
    case "queued":
      return {
        tone: "ok",
        title: "Channel queued",
        text: `${message} Each of its ${fmt(details.video_count)} videos is ingested on its own.`,
      };
    default:
      return {
        tone: "error",
        title: "It did not work",
        text:
          message +
          (details.retryable ? " This looks temporary: trying again later may work." : ""),
      };
  }
}

function showResult(result) {
  const { tone, title, text } = describeResult(result);
  $("ingest-result").replaceChildren(
    h("div", { class: `result-box ${tone}`, dataset: { status: result.status } }, h("strong", { text: `${title}. ` }), text),
  );
  $("ingest-result").dataset.status = result.status;
  for (const node of $("ingest-steps").querySelectorAll("[aria-current]")) {
    node.removeAttribute("aria-current");
  }
}

function addStep(type, data, id) {
  const list = $("ingest-steps");
  for (const node of list.querySelectorAll("[aria-current]")) node.removeAttribute("aria-current");
  let item;
  if (type === "progress") {
    item = h(
      "li",
      { class: "step", dataset: { event: type, step: data.step || "", id }, "aria-current": "step" },
      h("span", { class: "step-name", text: humanize(data.step) }),
      data.message ? h("span", { class: "step-message", text: data.message }) : null,
    );
  } else {
    const words = {
      requested: "Requested",
      started: data.attempt > 1 ? `Started again (attempt ${data.attempt})` : "Started",
      interrupted: "Interrupted",
    };
    const label = words[type] || humanize(type);
    item = h(
      "li",
      { class: `step lifecycle lifecycle-${type}`, dataset: { event: type, id } },
      h("span", { class: "step-name", text: label }),
      data.message && data.message !== label
        ? h("span", { class: "step-message", text: data.message })
        : null,
    );
  }
  list.append(item);
}

function followIngest(ingestId, url, joined = false) {
  following?.stop();
  sessionStorage.setItem(INGEST_KEY, JSON.stringify({ id: ingestId, url }));
  $("ingest-progress").hidden = false;
  $("ingest-progress").dataset.ingest = ingestId;
  $("ingest-title").replaceChildren(
    joined ? "Already running, following it: " : "Ingest of ",
    h("span", { class: "url", text: url }),
  );
  $("ingest-steps").replaceChildren();
  $("ingest-result").replaceChildren();
  delete $("ingest-result").dataset.status;
  // From the stream's start: after a reload the list is empty, and the log replays every step
  // once; after a drop within the page the stream resumes after the last step it showed.
  const stream = new SseStream({
    path: () => `/ingests/${encodeURIComponent(ingestId)}/stream`,
    onEvent: (type, data, id) => {
      if (id === null) return; // heartbeat
      if (type === "complete") {
        showResult(data);
        stream.stop();
      } else {
        addStep(type, data, id);
      }
    },
    onEnd: async (reason, status, detail) => {
      if (status === 404) {
        sessionStorage.removeItem(INGEST_KEY);
        $("ingest-result").replaceChildren(
          h("div", { class: "result-box error" }, "The service no longer knows this ingest."),
        );
      } else if (reason === "error") {
        $("ingest-result").replaceChildren(h("div", { class: "result-box error" }, detail));
      }
    },
  });
  following = stream.start();
}

export function dismissIngest() {
  following?.stop();
  following = null;
  sessionStorage.removeItem(INGEST_KEY);
  $("ingest-progress").hidden = true;
  $("ingest-url").focus();
}

export function resumeIngest() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(INGEST_KEY) || "null");
    if (saved && saved.id) followIngest(saved.id, saved.url || saved.id);
  } catch {
    sessionStorage.removeItem(INGEST_KEY);
  }
}
