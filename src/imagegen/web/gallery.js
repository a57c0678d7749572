// Recent outputs, newest first, from GET /api/jobs?status=succeeded (paged with `before`): every
// stored image of each job, opened large in a dialog with its seed and parameters.

import { api } from "./api.js";
import { $, h } from "./dom.js";
import { BlobUrls, renderImage } from "./results.js";

const JOBS_PER_PAGE = 12;

export class Gallery {
  constructor(section, { onReuseSeed }) {
    this.grid = $("#gallery-grid", section);
    this.status = $("#gallery-status", section);
    this.newer = $("#gallery-newer", section);
    this.older = $("#gallery-older", section);
    this.viewer = $("#viewer");
    this.onReuseSeed = onReuseSeed;
    this.blobs = new BlobUrls();
    this.viewerBlobs = new BlobUrls();
    // `before` of each page shown so far: "Newer" walks back through it.
    this.pages = [null];
    this.next = null;
    this.loading = false;
    this.newer.addEventListener("click", () => { this.pages.pop(); this.load(); });
    this.older.addEventListener("click", () => { this.pages.push(this.next); this.load(); });
    $("#gallery-refresh", section).addEventListener("click", () => { this.pages = [null]; this.load(); });
    $("#viewer-close").addEventListener("click", () => this.viewer.close());
    this.viewer.addEventListener("close", () => { $("#viewer-body").replaceChildren(); this.viewerBlobs.revokeAll(); });
  }

  get onFirstPage() { return this.pages.length === 1; }

  async load() {
    if (this.loading) return;
    this.loading = true;
    const before = this.pages[this.pages.length - 1];
    const query = new URLSearchParams({ status: "succeeded", limit: String(JOBS_PER_PAGE) });
    if (before !== null) query.set("before", String(before));
    try {
      const page = await api(`api/jobs?${query}`);
      this.next = page.next_before;
      this.render(page.jobs);
    } catch (error) {
      this.status.textContent = `Could not load the gallery: ${error.message}`;
    } finally {
      this.loading = false;
      this.newer.disabled = this.onFirstPage;
      this.older.disabled = this.next === null;
    }
  }

  render(jobs) {
    this.blobs.revokeAll();
    const tiles = [];
    for (const job of jobs) {
      for (const image of job.result?.images || []) {
        if (image.filename && !image.nsfw) tiles.push(this.tile(job, image));
      }
    }
    this.grid.replaceChildren(...tiles);
    const page = this.pages.length;
    this.status.textContent = tiles.length
      ? `Page ${page}: ${tiles.length} image${tiles.length > 1 ? "s" : ""}, newest first.`
      : (page === 1 ? "No images yet: generate one above." : "No older images.");
  }

  tile(job, image) {
    const img = h("img", { alt: "", width: image.width, height: image.height, loading: "lazy" });
    const label = `Open image: ${job.parameters.prompt} (seed ${image.seed})`;
    const item = h("li", { class: "tile", "data-filename": image.filename },
      h("button", { type: "button", "aria-label": label, title: job.parameters.prompt, onclick: () => this.open(job, image) }, img),
      h("span", { class: "tile-caption" }, h("span", { class: "tile-prompt" }, job.parameters.prompt), `seed ${image.seed}`));
    this.blobs.load(image.filename).then((url) => {
      img.src = url;
      img.addEventListener("load", () => item.classList.toggle("small", img.naturalWidth < 256), { once: true });
    }).catch(() => item.classList.add("missing"));
    return item;
  }

  open(job, image) {
    $("#viewer-title").textContent = job.parameters.prompt;
    $("#viewer-body").replaceChildren(renderImage(job, image, {
      blobs: this.viewerBlobs,
      onReuseSeed: (seed) => { this.viewer.close(); this.onReuseSeed(seed); },
    }));
    this.viewer.showModal();
  }
}
