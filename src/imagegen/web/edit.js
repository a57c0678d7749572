// The edit mode of the Create form (docs/editing.md): drop or pick images (the init image, or several
// references on models that take them), a strength slider, and a brush to paint a mask over the first
// image. What the selected backend's model can do (its `modes`, `max_input_images`) decides what shows.
// Images travel as data: URLs in the JSON body of POST /api/jobs; the server sniffs and checks them.

import { imageBlob } from "./api.js";
import { $, announce, h } from "./dom.js";

const ACCEPTED = new Set(["image/png", "image/jpeg", "image/webp"]);

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export class EditPanel {
  constructor(root) {
    this.root = root;
    this.images = [];  // { name, url (data:), width, height }
    this.caps = null;
    this.painted = false;
    this.drawing = false;
    this.files = $("#edit-files", root);
    this.list = $("#edit-images", root);
    this.canvas = $("#mask-canvas", root);
    this.files.addEventListener("change", () => { this.addFiles([...this.files.files]); this.files.value = ""; });
    const zone = $("#drop-zone", root);
    zone.addEventListener("click", () => this.files.click());
    zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); this.files.click(); }
    });
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      this.addFiles([...event.dataTransfer.files]);
    });
    const strength = $("#strength", root);
    strength.addEventListener("input", () => { $("#strength-value", root).textContent = Number(strength.value).toFixed(2); });
    $("#mask-clear", root).addEventListener("click", () => this.clearMask());
    this.canvas.addEventListener("pointerdown", (event) => this.paintStart(event));
    this.canvas.addEventListener("pointermove", (event) => this.paint(event));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      this.canvas.addEventListener(name, () => { this.drawing = false; });
    }
  }

  get modes() { return this.caps ? this.caps.modes || ["txt2img"] : ["txt2img"]; }
  get takesReferences() { return this.modes.includes("edit"); }
  get maxImages() { return this.takesReferences ? this.caps.max_input_images : 1; }

  // Called by the form when the backend changes: show what its model can do with images.
  applyCaps(caps) {
    this.caps = caps;
    const usable = this.modes.some((mode) => mode !== "txt2img");
    this.root.hidden = !usable;
    this.files.multiple = this.takesReferences;
    const hint = this.takesReferences
      ? `Up to ${this.maxImages} reference images (the first sets the size).`
      : "One image to start from; paint over it to repaint only that part.";
    $("#edit-hint", this.root).textContent = usable ? hint : "";
    while (this.images.length > this.maxImages) this.images.pop();
    this.render();
  }

  async addFiles(files) {
    for (const file of files) {
      if (!ACCEPTED.has(file.type)) { announce(`${file.name}: only PNG, JPEG or WebP images`); continue; }
      await this.addBlob(file, file.name);
    }
  }

  async addBlob(blob, name) {
    const url = await readAsDataUrl(blob);
    const size = await new Promise((resolve, reject) => {
      const probe = new Image();
      probe.onload = () => resolve([probe.naturalWidth, probe.naturalHeight]);
      probe.onerror = () => reject(new Error("not an image"));
      probe.src = url;
    });
    if (!this.takesReferences) this.images = [];
    if (this.images.length >= this.maxImages) { announce(`At most ${this.maxImages} images for this model`); return; }
    this.images.push({ name, url, width: size[0], height: size[1] });
    if (this.images.length === 1) this.clearMask();
    this.render();
  }

  // "Use as input" on a result: the stored image, fetched with the key.
  async useResult(filename) {
    await this.addBlob(await imageBlob(filename), filename);
    this.root.scrollIntoView({ block: "nearest" });
    announce(`${filename} will be used as input`);
  }

  remove(index) {
    this.images.splice(index, 1);
    if (index === 0) this.clearMask();
    this.render();
  }

  render() {
    this.list.replaceChildren(...this.images.map((image, index) => h("li", { class: "edit-image" },
      h("img", { src: image.url, alt: `Input ${index + 1}: ${image.name}`, width: image.width, height: image.height }),
      h("span", { class: "edit-size" }, `${image.width} × ${image.height}`),
      h("button", { type: "button", class: "remove", "aria-label": `Remove ${image.name}`, onclick: () => this.remove(index) }, "Remove"),
    )));
    const first = this.images[0];
    const size = $("#edit-size-hint", this.root);
    size.textContent = first ? `The result takes this image's size (${first.width} × ${first.height}, rounded to the model's ` +
      "multiple) unless you choose a Custom size below." : "";
    const inpaint = Boolean(first) && this.modes.includes("inpaint") && !(this.takesReferences && this.images.length > 1);
    $("#mask-tools", this.root).hidden = !inpaint;
    const strengthShown = Boolean(first) && (this.modes.includes("img2img") || (inpaint && this.painted));
    $("#strength-field", this.root).hidden = !strengthShown;
    if (inpaint) {
      $("#mask-base", this.root).src = first.url;
      if (this.canvas.width !== first.width || this.canvas.height !== first.height) {
        Object.assign(this.canvas, { width: first.width, height: first.height });
        this.painted = false;
      }
    }
  }

  clearMask() {
    this.canvas.getContext("2d").clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.render();
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (this.canvas.width / box.width), (event.clientY - box.top) * (this.canvas.height / box.height)];
  }

  paintStart(event) {
    this.drawing = true;
    this.canvas.setPointerCapture?.(event.pointerId);
    this.last = this.point(event);
    this.paint(event);
  }

  paint(event) {
    if (!this.drawing) return;
    const [x, y] = this.point(event);
    const context = this.canvas.getContext("2d");
    const box = this.canvas.getBoundingClientRect();
    // Opaque white strokes on a transparent canvas: the server reads the alpha (painted = repaint).
    context.strokeStyle = "#fff";
    context.lineCap = "round";
    context.lineWidth = Number($("#brush-size", this.root).value) * (this.canvas.width / box.width);
    context.beginPath();
    context.moveTo(...this.last);
    context.lineTo(x, y);
    context.stroke();
    this.last = [x, y];
    if (!this.painted) { this.painted = true; this.render(); }
  }

  // The fields this panel adds to the request body (none without images).
  bodyFields() {
    if (!this.images.length || this.root.hidden) return {};
    const fields = { images: this.images.map((image) => image.url) };
    if (this.painted && !$("#mask-tools", this.root).hidden) fields.mask = this.canvas.toDataURL("image/png");
    if (!$("#strength-field", this.root).hidden) fields.strength = Number($("#strength", this.root).value);
    return fields;
  }

  get hasImages() { return this.images.length > 0 && !this.root.hidden; }
}
