// Recent outputs, newest first, from GET /api/jobs?status=succeeded (paged with `before`, filtered by
// prompt text with `prompt`): every stored image of each job, opened large in a dialog with its seed and
// parameters, "use these settings", and delete (after a confirmation).

import { api, deleteImage } from "./api.js";
import { $, announce, h } from "./dom.js";
import { BlobUrls, renderImage } from "./results.js";

const JOBS_PER_PAGE = 12;
const FILTER_DELAY_MS = 250;

export class Gallery {
  constructor(section, { onReuseSeed, onUseSettings }) {
    this.grid = $("#gallery-grid", section);
    this.status = $("#gallery-status", section);
    this.newer = $("#gallery-newer", section);
    this.older = $("#gallery-older", section);
    this.filter = $("#gallery-filter", section);
    this.viewer = $("#viewer");
    this.confirm = $("#confirm-delete");
    this.onReuseSeed = onReuseSeed;
    this.onUseSettings = onUseSettings;
    this.blobs = new BlobUrls();
    this.viewerBlobs = new BlobUrls();
    // `before` of each page shown so far: "Newer" walks back through it.
    this.pages = [null];
    this.next = null;
    this.loading = false;
    this.again = false;
    this.newer.addEventListener("click", () => { this.pages.pop(); this.load(); });
    this.older.addEventListener("click", () => { this.pages.push(this.next); this.load(); });
    $("#gallery-refresh", section).addEventListener("click", () => { this.pages = [null]; this.load(); });
    let timer = null;
    this.filter.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { this.pages = [null]; this.load(); }, FILTER_DELAY_MS);
    });
    $("#viewer-close").addEventListener("click", () => this.viewer.close());
    $("#confirm-delete-cancel").addEventListener("click", () => this.confirm.close("cancel"));
    $("#confirm-delete-ok").addEventListener("click", () => this.confirm.close("delete"));
    this.viewer.addEventListener("close", () => { $("#viewer-body").replaceChildren(); this.viewerBlobs.revokeAll(); });
  }

  get onFirstPage() { return this.pages.length === 1; }

  async load() {
    if (this.loading) {
      this.again = true;  // a filter typed while a page loads: load again with it
      return;
    }
    this.loading = true;
    this.again = false;
    const before = this.pages[this.pages.length - 1];
    const query = new URLSearchParams({ status: "succeeded", limit: String(JOBS_PER_PAGE) });
    if (before !== null) query.set("before", String(before));
    const text = this.filter.value.trim();
    if (text) query.set("prompt", text);
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
      if (this.again) this.load();
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
    const filtered = this.filter.value.trim();
    const empty = filtered
      ? "No image's prompt contains that text."
      : (page === 1 ? "No images yet: generate one above." : "No older images.");
    this.status.textContent = tiles.length
      ? `Page ${page}: ${tiles.length} image${tiles.length > 1 ? "s" : ""}, newest first${filtered ? ", filtered by prompt" : ""}.`
      : empty;
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
    }).catch((error) => {
      // Deleted (here, by retention, or by hand): the job record outlives its files; the tile goes.
      if (error.status === 404) item.remove();
      else item.classList.add("missing");
    });
    return item;
  }

  open(job, image) {
    $("#viewer-title").textContent = job.parameters.prompt;
    $("#viewer-body").replaceChildren(renderImage(job, image, {
      blobs: this.viewerBlobs,
      onReuseSeed: (seed) => { this.viewer.close(); this.onReuseSeed(seed); },
      onUseSettings: (...args) => { this.viewer.close(); this.onUseSettings(...args); },
      onDelete: () => this.askDelete(image),
    }));
    this.viewer.showModal();
  }

  // A second dialog says which image and asks; Escape or Cancel keeps it.
  askDelete(image) {
    $("#confirm-delete-name").textContent = image.filename;
    this.confirm.returnValue = "";
    this.confirm.addEventListener("close", async () => {
      if (this.confirm.returnValue !== "delete") return;
      try {
        await deleteImage(image.filename);
        this.viewer.close();
        this.grid.querySelector(`li[data-filename="${CSS.escape(image.filename)}"]`)?.remove();
        announce(`Deleted ${image.filename}`);
      } catch (error) {
        this.status.textContent = `Could not delete the image: ${error.message}`;
      }
    }, { once: true });
    this.confirm.showModal();
  }
}
