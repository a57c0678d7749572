// The service's queue, every client's jobs: running ones with their progress, queued ones in
// order, each with Cancel. Polled while the tab is visible (the list has no event stream).

import { api } from "./api.js";
import { $, h } from "./dom.js";

const POLL_MS = 2000;

export class QueueView {
  constructor(section, { onChange }) {
    this.list = $("#queue-list", section);
    this.summary = $("#queue-summary", section);
    this.onChange = onChange;
    this.timer = null;
    this.busy = false;
    document.addEventListener("visibilitychange", () => { if (!document.hidden) this.refresh(); });
  }

  start() {
    this.stop();
    this.refresh();
    this.timer = setInterval(() => { if (!document.hidden) this.refresh(); }, POLL_MS);
  }

  stop() { clearInterval(this.timer); this.timer = null; }

  async refresh() {
    if (this.busy) {
      this.again = true;
      return;
    }
    this.busy = true;
    this.again = false;
    try {
      const [running, queued] = await Promise.all([
        api("api/jobs?status=running&limit=50"), api("api/jobs?status=queued&limit=200"),
      ]);
      // Oldest first reads like a queue; each lane (local device, cloud) has its own positions.
      const waiting = queued.jobs.slice().sort((a, b) => (a.queue_position ?? 1e9) - (b.queue_position ?? 1e9));
      this.render(running.jobs, waiting);
      this.onChange({ running: running.jobs.length, queued: queued.jobs.length });
    } catch (error) {
      if (error.status === 401) this.stop();
      else this.summary.textContent = `Could not load the queue: ${error.message}`;
    } finally {
      this.busy = false;
      if (this.again && this.timer) this.refresh();
    }
  }

  render(running, queued) {
    const count = running.length + queued.length;
    this.summary.textContent = count
      ? `${running.length} running, ${queued.length} queued.`
      : "Nothing running or queued.";
    // Keep focus on a Cancel button that survives the refresh (keyboard users).
    const focused = document.activeElement?.closest?.("#queue-list li")?.dataset.jobId;
    this.list.replaceChildren(...running.map((job) => this.row(job)), ...queued.map((job) => this.row(job)));
    if (focused) this.list.querySelector(`li[data-job-id="${focused}"] button`)?.focus();
  }

  row(job) {
    const { step, total } = job.progress || {};
    const state = job.status === "running"
      ? (total ? `running · step ${step} of ${total}` : "running")
      : `queued · ${job.queue_position === 0 ? "next" : `${job.queue_position ?? "?"} ahead`}`;
    const cancel = h("button", { type: "button", "aria-label": `Cancel job: ${job.parameters.prompt}` }, "Cancel");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`api/jobs/${job.id}/cancel`, { method: "POST" });
      } catch (error) {
        if (error.status !== 409) this.summary.textContent = `Cancel failed: ${error.message}`;
      }
      this.refresh();
    });
    return h("li", { "data-job-id": job.id, "data-status": job.status },
      h("span", { class: "queue-state" }, state),
      h("span", { class: "queue-prompt" }, job.parameters.prompt),
      h("span", { class: "queue-backend" }, job.backend),
      cancel);
  }
}
