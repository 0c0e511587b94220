// Requests to the service, with the access token when it asks for one.

import { $ } from "./dom.js";

const TOKEN_KEY = "activity.token";

let token = localStorage.getItem(TOKEN_KEY) || "";
let asking = null;
let declined = false;

// Ask once, shared by every request that got a 401 meanwhile; true once a token is entered.
// After a cancel it asks no more by itself, until the user asks for the dialog (`force`).
export function askToken({ force = false } = {}) {
  if (declined && !force) return Promise.resolve(false);
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = $("token-dialog");
      const input = $("token-input");
      input.value = "";
      dialog.addEventListener(
        "close",
        () => {
          const value = input.value.trim();
          asking = null;
          if (dialog.returnValue === "save" && value) {
            token = value;
            declined = false;
            localStorage.setItem(TOKEN_KEY, value);
            window.dispatchEvent(new Event("activity-token"));
            resolve(true);
          } else {
            declined = true;
            resolve(false);
          }
        },
        { once: true },
      );
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
  }
  return asking;
}

// fetch() with the token. A 401 is retried with a token entered meanwhile (the request went
// out before it), else asks for one and tries once more with it.
export async function api(path, options = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const used = token;
    const headers = new Headers(options.headers || {});
    if (used) headers.set("Authorization", `Bearer ${used}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 1) return response;
    if (token !== used) continue;
    if (!(await askToken())) return response;
  }
}

// The error's own words, without the "field: " prefix the service puts before them.
export async function errorText(response) {
  try {
    const body = await response.json();
    const detail = body.detail || `HTTP ${response.status}`;
    const field = body.extra && body.extra.field;
    return field && detail.startsWith(`${field}: `) ? detail.slice(field.length + 2) : detail;
  } catch {
    return `HTTP ${response.status}`;
  }
}
