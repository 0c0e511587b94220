// SSE over fetch(): unlike EventSource it sees every event name (the log viewer cannot know
// them in advance) and the HTTP status (401, 204, 404), and sends the Authorization header.
// After a drop it reconnects with the Last-Event-ID header; a frame whose id is not past the
// last one seen is dropped, so a resumed stream never shows a row twice.

import { api, errorText } from "./api.js";
import { $ } from "./dom.js";

const IDLE_MS = 45000; // no byte (not even a heartbeat) for this long: the connection is dead

const streams = new Set();

// Wait ``ms``, or less if a token is entered meanwhile (it is tried at once).
export function pause(ms) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("activity-token", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    window.addEventListener("activity-token", done);
  });
}

function showConnection() {
  const states = [...streams].map((stream) => stream.state);
  const element = $("connection");
  let state = "live";
  if (states.includes("unauthorized")) state = "unauthorized";
  else if (states.includes("reconnecting")) state = "reconnecting";
  else if (states.includes("connecting") || states.length === 0) state = "connecting";
  const labels = {
    live: "Live",
    reconnecting: "Reconnecting…",
    connecting: "Connecting…",
    unauthorized: "Access token needed",
  };
  if (element.dataset.state !== state) {
    element.dataset.state = state;
    $("connection-label").textContent = labels[state];
    $("token-button").hidden = state !== "unauthorized";
  }
}

export class SseStream {
  // path(): the URL to (re)connect to. lastId: resume after this position (null: from the
  // stream's start). strict: ids must increase (log events); false for snapshots (stats).
  constructor({ path, lastId = null, strict = true, onEvent, onEnd }) {
    this.path = path;
    this.lastId = lastId;
    this.strict = strict;
    this.onEvent = onEvent;
    this.onEnd = onEnd || (() => {});
    this.state = "connecting";
    this.retryMs = 3000;
    this.failures = 0;
    this.stopped = false;
    this.controller = null;
  }

  start() {
    streams.add(this);
    showConnection();
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
    streams.delete(this);
    showConnection();
  }

  setState(state) {
    this.state = state;
    showConnection();
  }

  async run() {
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        const headers = { Accept: "text/event-stream" };
        if (this.lastId !== null) headers["Last-Event-ID"] = String(this.lastId);
        const response = await api(this.path(), {
          headers,
          signal: this.controller.signal,
          cache: "no-store",
        });
        if (response.status === 204) return this.finish("finished");
        if (response.status === 401) {
          // api() has asked already; a token entered later ends the pause below at once.
          this.setState("unauthorized");
        } else if (response.status >= 400 && response.status < 500) {
          return this.finish("error", response.status, await errorText(response));
        } else if (!response.ok || !response.body) {
          throw new Error(`HTTP ${response.status}`);
        } else {
          this.setState("live");
          this.failures = 0;
          await this.read(response.body);
        }
      } catch (error) {
        if (this.stopped) return;
      }
      if (this.stopped) return;
      if (this.state !== "unauthorized") this.setState("reconnecting");
      const backoff = Math.min(30000, this.retryMs * 2 ** Math.min(this.failures, 4));
      this.failures += 1;
      await pause(backoff * (0.8 + Math.random() * 0.4));
    }
  }

  finish(reason, status, detail) {
    this.stop();
    this.onEnd(reason, status, detail);
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let idle = setTimeout(() => this.controller.abort(), IDLE_MS);
    let buffer = "";
    let frame = { data: [], event: "", id: null };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.stopped) return;
        clearTimeout(idle);
        idle = setTimeout(() => this.controller.abort(), IDLE_MS);
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (let line of lines) {
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            this.dispatch(frame);
            if (this.stopped) return;
            frame = { data: [], event: "", id: null };
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon === -1 ? line : line.slice(0, colon);
          let value = colon === -1 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") frame.data.push(value);
          else if (field === "event") frame.event = value;
          else if (field === "id") frame.id = value;
          else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
        }
      }
    } finally {
      clearTimeout(idle);
      reader.cancel().catch(() => {});
    }
  }

  dispatch(frame) {
    if (frame.data.length === 0) return;
    const data = JSON.parse(frame.data.join("\n"));
    const type = frame.event || "message";
    if (frame.id !== null && frame.id !== "") {
      const id = Number(frame.id);
      if (this.lastId !== null && (this.strict ? id <= this.lastId : id < this.lastId)) return;
      this.lastId = id;
      this.onEvent(type, data, id);
      return;
    }
    // An id past the log's head: the server continues from its head, and so do we.
    if (type === "reset") this.lastId = data.head;
    this.onEvent(type, data, null);
  }
}
