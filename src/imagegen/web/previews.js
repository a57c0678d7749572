// Live previews in a job card: the `preview` events of the job's stream (GET .../events?previews=true) are
// small JPEGs of the current latents, shown in place of the image to come, with the ETA the `progress`
// events carry (measured from the step rate on the server).

import { h } from "./dom.js";

export function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return "less than a second left";
  if (seconds < 90) return `about ${Math.round(seconds)} s left`;
  return `about ${Math.round(seconds / 60)} min left`;
}

function blobOf(b64, mimeType) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let index = 0; index < binary.length; index += 1) bytes[index] = binary.charCodeAt(index);
  return new Blob([bytes], { type: mimeType });
}

// One preview image per job card; each new preview replaces the last (its blob URL is revoked).
export class LivePreview {
  constructor(label) {
    this.url = null;
    this.img = h("img", { class: "live-preview", alt: `Live preview: ${label}` });
    this.caption = h("p", { class: "hint preview-caption" });
    this.element = h("figure", { class: "preview", hidden: true }, this.img, this.caption);
  }

  show({ step, total, mime_type: mimeType, b64 }) {
    const previous = this.url;
    this.url = URL.createObjectURL(blobOf(b64, mimeType || "image/jpeg"));
    this.img.src = this.url;
    // An image keeps showing what it decoded: the previous URL can go at once.
    if (previous) URL.revokeObjectURL(previous);
    this.element.dataset.step = String(step);
    this.caption.textContent = `Preview at step ${step} of ${total}`;
    this.element.hidden = false;
  }

  // Once the image itself (or an error) is shown, the preview goes.
  clear() {
    this.element.remove();
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = null;
  }
}
