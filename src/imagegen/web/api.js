// Every call to the service goes through here: the key (when there is one) travels as the
// X-API-Key header, never in a URL, and errors arrive as ApiError with the envelope's fields.
// Paths are relative ("api/jobs"), so the page also works behind a proxy under a sub-path.

import { readEvents } from "./sse.js";

const KEY_ITEM = "imagegen.apiKey";

// Session storage: the key lives as long as the tab, and is not shared with other tabs or kept on disk
// after the browser closes.
export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM) || "",
  set: (key) => sessionStorage.setItem(KEY_ITEM, key),
  clear: () => sessionStorage.removeItem(KEY_ITEM),
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the service answered ${status}`);
    this.status = status;
    this.type = error.type || "http_error";
    this.param = error.param || null;
    this.requestId = error.request_id || null;
  }
}

let unauthorized = () => {};
// Called on any 401: the key is missing, wrong, or was changed on the server.
export function onUnauthorized(handler) { unauthorized = handler; }

function headers(extra = {}) {
  const result = new Headers(extra);
  const key = apiKey.get();
  if (key) result.set("X-API-Key", key);
  return result;
}

async function failure(response) {
  const body = await response.json().catch(() => null);
  const error = new ApiError(response.status, body);
  if (response.status === 401) unauthorized(error);
  return error;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, cache: "no-store", headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers.set("Content-Type", "application/json");
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// The page's own settings (public): whether to ask for a key before anything else.
export async function pageConfig() {
  const response = await fetch("web/config.json", { cache: "no-store" });
  return response.ok ? response.json() : { auth_required: false };
}

export async function deleteImage(filename) {
  const response = await fetch(`api/images/${encodeURIComponent(filename)}`, { method: "DELETE", headers: headers() });
  if (!response.ok && response.status !== 404) throw await failure(response);
}

// An <img> cannot send a header, so images are fetched with the key and shown from a blob: URL.
// The caller revokes the URL when the image leaves the page.
export async function imageBlobUrl(filename, signal) {
  return URL.createObjectURL(await imageBlob(filename, signal));
}

// A stored image's bytes (the edit mode's "use as input": a blob: URL cannot be fetched under the CSP).
export async function imageBlob(filename, signal) {
  const response = await fetch(`api/images/${encodeURIComponent(filename)}`, { signal, headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

// Follows a job's event stream (with its live previews); resolves with the final job body, or null if the
// stream ended early.
export async function followEvents(jobId, onEvent, signal) {
  const response = await fetch(`api/jobs/${jobId}/events?previews=true`, {
    signal, cache: "no-store", headers: headers({ Accept: "text/event-stream" }),
  });
  if (!response.ok) throw await failure(response);
  let final = null;
  await readEvents(response, ({ event, data }) => {
    const parsed = JSON.parse(data);
    if (["succeeded", "failed", "cancelled"].includes(event)) final = parsed;
    onEvent(event, parsed);
  });
  return final;
}
