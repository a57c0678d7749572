// This tab's jobs: one card per job with live progress from its event stream (queue position,
// step x of y), a Cancel button, then the result images or the error.

import { api, followEvents } from "./api.js";
import { formatSeconds, h } from "./dom.js";
import { formatEta, LivePreview } from "./previews.js";
import { renderImage } from "./results.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function queuedText(position) {
  if (position === null || position === undefined) return "Queued";
  return position === 0 ? "Queued: next in line" : `Queued: ${position} ahead`;
}

class JobCard {
  constructor(id, request, { blobs, onReuseSeed, onUseAsInput, onUseSettings, onFinished }) {
    this.id = id;
    this.blobs = blobs;
    this.onReuseSeed = onReuseSeed;
    this.onUseAsInput = onUseAsInput;
    this.onUseSettings = onUseSettings;
    this.onFinished = onFinished;
    this.preview = new LivePreview(request.prompt);
    this.status = "queued";
    this.progress = h("progress", { max: "1", value: "0", "aria-label": "Progress" });
    this.state = h("span", { class: "job-state", role: "status" }, "Queued");
    this.cancel = h("button", { type: "button", class: "cancel", onclick: () => this.requestCancel() }, "Cancel");
    this.images = h("div", { class: "job-images" });
    this.error = h("p", { class: "error", role: "alert" });
    const size = request.width && request.height ? `${request.width} × ${request.height}` : "";
    this.element = h("article", { class: "job", "data-job-id": id, "data-status": "queued" },
      h("header", { class: "job-head" },
        h("p", { class: "job-prompt" }, request.prompt),
        h("p", { class: "job-meta" }, [request.backend, request.images?.length ? (request.mask ? "inpaint" : "from image") : "",
          size, `${request.num_images} image${request.num_images > 1 ? "s" : ""}`]
          .filter(Boolean).join(" · "))),
      h("div", { class: "job-progress" }, this.progress, this.state, this.cancel),
      this.error,
      this.preview.element,
      this.images,
    );
  }

  setStatus(status, text) {
    this.status = status;
    this.element.dataset.status = status;
    this.state.textContent = text;
  }

  showProgress(step, total, eta) {
    if (!total) return;
    this.progress.max = total;
    this.progress.value = step;
    const text = step > 0 ? `Step ${step} of ${total}` : "Starting…";
    this.setStatus("running", [text, formatEta(eta)].filter(Boolean).join(" · "));
  }

  handle(event, data) {
    if (event === "queued") this.setStatus("queued", queuedText(data.queue_position));
    else if (event === "running") {
      if (data.total) this.showProgress(data.step, data.total, data.eta_seconds);
      else this.setStatus("running", "Running…");
    } else if (event === "progress") this.showProgress(data.step, data.total, data.eta_seconds);
    else if (event === "preview") {
      if (this.element.dataset.final !== "true") this.preview.show(data);
    } else if (FINAL.has(event)) this.finish(data);
  }

  async follow() {
    let final = null;
    try {
      final = await followEvents(this.id, (event, data) => this.handle(event, data));
    } catch (error) {
      if (error.status === 401) return;
      // The stream broke (proxy buffering, network): fall back to polling the job.
    }
    while (!final && !FINAL.has(this.status)) {
      try {
        const job = await api(`api/jobs/${this.id}?include_images=false`);
        if (FINAL.has(job.status)) final = job;
        else if (job.status === "queued") this.handle("queued", job);
        else this.handle("running", job.progress || {});
      } catch (error) {
        if (error.status === 401 || error.status === 404) return;
      }
      if (!final) await sleep(POLL_MS);
    }
    if (final && this.element.dataset.final !== "true") this.finish(final);
  }

  async requestCancel() {
    this.cancel.disabled = true;
    this.state.textContent = "Cancelling…";
    try {
      this.finish(await api(`api/jobs/${this.id}/cancel`, { method: "POST" }));
    } catch (error) {
      // 409: it finished meanwhile; its final event shows how.
      if (error.status !== 409) {
        this.error.textContent = `Cancel failed: ${error.message}`;
        this.cancel.disabled = false;
      }
    }
  }

  finish(job) {
    if (this.element.dataset.final === "true") return;
    this.element.dataset.final = "true";
    this.cancel.hidden = true;
    this.preview.clear();
    const { step, total } = job.progress || {};
    if (job.status === "succeeded") {
      this.progress.max = total || 1;
      this.progress.value = total || 1;
      const ms = job.result?.timings?.generation_ms;
      const steps = total ? `${step} of ${total} steps` : "";
      this.setStatus("succeeded", ["Done", steps, ms ? formatSeconds(ms) : ""].filter(Boolean).join(" · "));
      const images = job.result?.images || [];
      this.images.replaceChildren(...images.map((image) =>
        renderImage(job, image, {
          blobs: this.blobs,
          onReuseSeed: this.onReuseSeed,
          onUseAsInput: this.onUseAsInput,
          onUseSettings: this.onUseSettings,
        })));
    } else if (job.status === "cancelled") {
      this.setStatus("cancelled", "Cancelled");
    } else {
      this.setStatus("failed", "Failed");
      const error = job.error || {};
      this.error.textContent = `${error.message || "the job failed"}${error.request_id ? ` (request ${error.request_id})` : ""}`;
    }
    this.onFinished(job);
  }
}

export class JobList {
  constructor(container, options) {
    this.container = container;
    this.options = options;
  }

  add(accepted, request) {
    const card = new JobCard(accepted.id, request, this.options);
    card.handle("queued", accepted);
    this.container.prepend(card.element);
    if (matchMedia("(max-width: 899px)").matches) card.element.scrollIntoView({ block: "nearest" });
    card.follow();
    return card;
  }
}
