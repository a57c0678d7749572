// One result image, large, with its seed and parameters: "Copy seed", "Reuse seed", "Use these settings",
// "Download" (and "Delete" where the caller offers it: the gallery's viewer).
// A flagged image (nsfw) has no pixels at all: it is shown as a labelled placeholder.

import { imageBlobUrl } from "./api.js";
import { announce, copyText, h } from "./dom.js";

function parameterList(job, image) {
  const p = job.parameters;
  const rows = [
    ...(p.negative_prompt ? [["Negative", p.negative_prompt]] : []),
    ["Size", `${image.width ?? p.width} × ${image.height ?? p.height}`],
    ...(p.mode && p.mode !== "txt2img" ? [["Mode", p.strength ? `${p.mode} · strength ${p.strength}` : p.mode]] : []),
    ["Steps", p.steps ?? "default"],
    ["Guidance", p.guidance_scale ?? "—"],
    ["Scheduler", p.scheduler ?? "—"],
    ["Backend", `${job.backend} · ${job.model}`],
    ...(p.loras?.length ? [["LoRAs", p.loras.map((lora) => `${lora.name} ${lora.weight}`).join(", ")]] : []),
    ["Format", p.output_format],
  ];
  return h("dl", { class: "params" }, rows.map(([name, value]) => [h("dt", {}, name), h("dd", {}, String(value))]));
}

// Blob URLs hold the image in memory until revoked: track them per container.
export class BlobUrls {
  constructor() { this.urls = new Set(); }
  async load(filename) {
    const url = await imageBlobUrl(filename);
    this.urls.add(url);
    return url;
  }
  revokeAll() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls.clear();
  }
}

export function renderImage(job, image, { blobs, onReuseSeed, onUseAsInput, onUseSettings, onDelete }) {
  const seedText = String(image.seed);
  const actions = h("div", { class: "image-actions" },
    h("button", { type: "button", onclick: async () => {
      try {
        await copyText(seedText);
        announce(`Seed ${seedText} copied`);
      } catch {
        announce(`Could not copy; the seed is ${seedText}`);
      }
    } }, "Copy seed"),
    onReuseSeed && h("button", { type: "button", onclick: () => onReuseSeed(image.seed) }, "Reuse seed"),
    onUseSettings && h("button", { type: "button", class: "use-settings", onclick: () => onUseSettings(job, image) },
      "Use these settings"),
  );
  const caption = h("figcaption", {},
    h("p", { class: "seed" }, "Seed ", h("strong", { class: "seed-value" }, seedText)),
    actions,
    parameterList(job, image),
  );

  if (image.nsfw || !image.filename) {
    const reason = image.nsfw ? "Hidden: flagged by the safety checker" : "Not stored";
    const placeholder = h("div", { class: "placeholder nsfw", role: "img", "aria-label": `${reason} (seed ${seedText})` },
      h("span", {}, reason));
    // CSSOM, not a style attribute: the page's CSP allows no inline styles.
    if (image.width && image.height) placeholder.style.aspectRatio = `${image.width} / ${image.height}`;
    return h("figure", { class: "result flagged" }, h("div", { class: "frame" }, placeholder), caption);
  }

  const img = h("img", { alt: `${job.parameters.prompt} (seed ${seedText})`, width: image.width, height: image.height });
  const download = h("a", { class: "button", download: image.filename, "aria-disabled": "true" }, "Download");
  actions.append(download);
  if (onUseAsInput) {
    actions.append(h("button", { type: "button", class: "use-input", onclick: () => onUseAsInput(image.filename) }, "Use as input"));
  }
  if (onDelete) actions.append(h("button", { type: "button", class: "danger", onclick: () => onDelete(job, image) }, "Delete"));
  const figure = h("figure", { class: "result loading" }, h("div", { class: "frame" }, img), caption);
  blobs.load(image.filename).then((url) => {
    img.src = url;
    download.href = url;
    download.removeAttribute("aria-disabled");
    // Tiny images are shown large: keep their pixels sharp instead of blurred.
    img.addEventListener("load", () => figure.classList.toggle("small", img.naturalWidth < 256), { once: true });
    figure.classList.remove("loading");
  }).catch((error) => {
    figure.classList.remove("loading");
    img.replaceWith(h("div", { class: "placeholder" }, h("span", {}, `Image unavailable: ${error.message}`)));
    download.remove();
  });
  return figure;
}
