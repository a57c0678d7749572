// The "Create" form: the backend choice (with each backend's health), the model choice when a backend
// offers several, and the parameters the chosen model supports, set from its capabilities in
// GET /api/backends. values() and apply() read and fill it as one settings object (settings.js).

import { $, h } from "./dom.js";

// A backend in these states accepts jobs (a loading one runs them once it has loaded).
const SELECTABLE = new Set(["ready", "loading"]);
const STATE_LABELS = {
  ready: "ready", loading: "loading", unavailable: "unavailable", error: "error", not_configured: "not configured",
};
const RATIOS = [["1:1", 1, 1], ["4:3", 4, 3], ["3:4", 3, 4], ["3:2", 3, 2], ["2:3", 2, 3], ["16:9", 16, 9], ["9:16", 9, 16]];
const SEED_MAX = 2 ** 32 - 1;

function roundTo(value, multiple) { return Math.max(multiple, Math.round(value / multiple) * multiple); }

// Presets keep the model's native pixel count, in common aspect ratios, each side a multiple of the
// backend's size_multiple and inside its limits; the native size itself comes first.
export function sizePresets(caps) {
  const [width, height] = caps.default_size;
  const m = caps.size_multiple;
  const low = Math.ceil(caps.min_size / m) * m;
  const fits = (w, h) => w >= low && h >= low && w <= caps.max_width && h <= caps.max_height && w * h <= caps.max_pixels;
  const presets = [{ width, height, label: `${width} × ${height} (native)` }];
  const area = width * height;
  for (const [name, rw, rh] of RATIOS) {
    const w = roundTo(Math.sqrt((area * rw) / rh), m);
    const h2 = roundTo(Math.sqrt((area * rh) / rw), m);
    if (fits(w, h2) && !presets.some((p) => p.width === w && p.height === h2)) {
      presets.push({ width: w, height: h2, label: `${w} × ${h2} (${name})` });
    }
  }
  return presets;
}

export function withServiceLimits(caps, limits) {
  if (!limits) return caps;
  return {
    ...caps,
    max_width: Math.min(caps.max_width, limits.max_width),
    max_height: Math.min(caps.max_height, limits.max_height),
    max_pixels: Math.min(caps.max_pixels, limits.max_pixels),
    max_steps: Math.min(caps.max_steps, limits.max_steps),
  };
}

export class GenerateForm {
  constructor(form, { onSubmit, onChange = () => {}, loras = null, editor = null }) {
    this.form = form;
    this.loras = loras;  // the LoRA picker (loras.js), told the backend and model chosen
    this.editor = editor;  // the edit mode (edit.js): images, mask, strength
    this.backends = new Map();
    this.selected = null;
    this.lastSeed = null;
    this.maxImages = 8;
    this.onChange = onChange;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.checkPixels();
      if (!form.reportValidity()) return;
      onSubmit(this.body());
    });
    form.addEventListener("input", () => this.onChange());
    form.addEventListener("change", () => this.onChange());
    // Enter generates from the prompt boxes too; Shift+Enter still starts a new line.
    for (const box of form.querySelectorAll("textarea")) {
      box.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          form.requestSubmit();
        }
      });
    }
    $("#backend-list", form).addEventListener("change", () => this.applyBackend());
    $("#model", form).addEventListener("change", () => this.applyModel());
    $("#size", form).addEventListener("change", () => this.applySize());
    $("#model", form).addEventListener("change", () => this.applyLoras());
    $("#seed-random", form).addEventListener("click", () => { $("#seed", form).value = ""; $("#seed", form).focus(); });
    $("#seed-reuse", form).addEventListener("click", () => this.useSeed(this.lastSeed));
  }

  setLimits(limits) {
    this.limits = limits;
    this.loras?.setLimit(limits.max_loras);
    this.maxImages = limits.max_images;
    $("#num-images", this.form).max = String(limits.max_images);
    for (const box of this.form.querySelectorAll("textarea")) box.maxLength = limits.max_prompt_chars;
  }

  // Updates the list in place (a refresh must not steal focus or the user's choice).
  setBackends(list, defaultId) {
    const container = $("#backend-list", this.form);
    for (const backend of list) {
      let entry = this.backends.get(backend.id);
      if (!entry) {
        const input = h("input", { type: "radio", name: "backend", value: backend.id, id: `backend-${backend.id}` });
        const badge = h("span", { class: "badge" });
        const reason = h("span", { class: "backend-reason" });
        const label = h("label", { class: "backend", for: input.id },
          input, h("span", { class: "backend-name" }, backend.id), badge, reason);
        container.append(label);
        entry = { input, badge, reason, label };
        this.backends.set(backend.id, entry);
      }
      const usable = SELECTABLE.has(backend.state);
      entry.data = backend;
      entry.input.disabled = !usable;
      entry.label.dataset.state = backend.state;
      entry.badge.textContent = STATE_LABELS[backend.state] || backend.state;
      entry.reason.textContent = backend.reason + (backend.default ? " · default" : "");
      entry.reason.title = entry.reason.textContent;  // long reasons are cut to a few lines: the full text on hover
    }
    if (!this.selectedEntry()) {
      const usable = [...this.backends.values()].filter((entry) => !entry.input.disabled);
      const pick = usable.find((entry) => entry.data.id === defaultId) || usable[0];
      if (pick) pick.input.checked = true;
      this.applyBackend();
    }
  }

  selectedEntry() {
    const entry = [...this.backends.values()].find((item) => item.input.checked);
    return entry && !entry.input.disabled ? entry : null;
  }

  applyBackend() {
    const entry = this.selectedEntry();
    const generate = $("#generate", this.form);
    generate.disabled = !entry;
    $("#no-backend", this.form).hidden = Boolean(entry);
    if (!entry || entry.data.id === this.selected) return;
    this.selected = entry.data.id;
    const offered = entry.data.capabilities.models;
    const models = $("#model", this.form);
    models.replaceChildren(...offered.map((name) => h("option", { value: name }, name)));
    models.value = offered.includes(entry.data.default_model) ? entry.data.default_model : offered[0];
    // The picker whenever there is a choice (sd with SD_MODELS, flux-api's BFL models).
    $("#model-field", this.form).hidden = offered.length < 2;
    this.applyModel();
  }

  // The chosen model's capabilities: sizes, steps, guidance, schedulers (an SDXL model beside an SD 1.5 one
  // has other defaults).
  applyModel() {
    const entry = this.selectedEntry();
    if (!entry) return;
    const model = $("#model", this.form).value;
    const own = entry.data.model_capabilities && entry.data.model_capabilities[model];
    // A backend may accept more than the service allows (SD_MAX_*): the lower bound wins.
    const caps = withServiceLimits(own || entry.data.capabilities, this.limits);
    this.caps = caps;

    const sizes = sizePresets(caps);
    $("#size", this.form).replaceChildren(
      ...sizes.map((p) => h("option", { value: `${p.width}x${p.height}` }, p.label)),
      h("option", { value: "custom" }, "Custom…"),
    );
    const m = caps.size_multiple;
    const low = Math.ceil(caps.min_size / m) * m;
    for (const [id, max] of [["#width", caps.max_width], ["#height", caps.max_height]]) {
      Object.assign($(id, this.form), { min: String(low), max: String(max), step: String(m) });
    }
    $("#size-hint", this.form).textContent = `Width and height: multiples of ${m}, ${low}–${Math.max(caps.max_width, caps.max_height)} px.`;
    this.applySize();

    const steps = $("#steps", this.form);
    Object.assign(steps, { max: String(caps.max_steps), value: caps.default_steps ?? "" });
    steps.placeholder = caps.default_steps ? String(caps.default_steps) : "backend default";

    $("#guidance-field", this.form).hidden = !caps.supports_guidance;
    $("#guidance", this.form).value = caps.default_guidance ?? "";

    const schedulers = $("#scheduler", this.form);
    schedulers.replaceChildren(...caps.schedulers.map((name) =>
      h("option", { value: name }, name === "default" ? "default (the model's own)" : name)));
    schedulers.value = caps.default_scheduler || caps.schedulers[0] || "";
    $("#scheduler-field", this.form).hidden = caps.schedulers.length === 0;

    $("#negative-field", this.form).hidden = !caps.supports_negative_prompt;
    $("#seed-field", this.form).hidden = !caps.supports_seed;

    const formats = $("#output-format", this.form);
    const current = formats.value;
    formats.replaceChildren(...caps.output_formats.map((name) => h("option", { value: name }, name.toUpperCase())));
    if (caps.output_formats.includes(current)) formats.value = current;

    $("#num-images", this.form).max = String(Math.min(this.maxImages, 64));
    this.applyLoras();
    this.editor?.applyCaps(caps);
  }

  applyLoras() {
    if (!this.loras || !this.caps) return;
    const model = this.caps.models.length > 1 ? $("#model", this.form).value : this.caps.models[0];
    this.loras.setTarget(this.selected, model, Boolean(this.caps.supports_loras));
  }

  applySize() {
    const choice = $("#size", this.form).value;
    const custom = choice === "custom";
    $("#custom-size", this.form).hidden = !custom;
    for (const id of ["#width", "#height"]) $(id, this.form).required = custom;
    if (!custom && choice) {
      const [width, height] = choice.split("x");
      $("#width", this.form).value = width;
      $("#height", this.form).value = height;
    }
  }

  checkPixels() {
    const height = $("#height", this.form);
    const pixels = Number($("#width", this.form).value) * Number(height.value);
    const max = this.caps ? this.caps.max_pixels : Infinity;
    height.setCustomValidity(pixels > max ? `Width × height must be at most ${max} pixels.` : "");
    if (pixels > max && $("#size", this.form).value !== "custom") {
      $("#size", this.form).value = "custom";
      this.applySize();
    }
  }

  // The form as one settings object (settings.js): what the next reload or "use these settings" restores.
  values() {
    const value = (id) => $(id, this.form).value;
    return {
      prompt: value("#prompt"), negative_prompt: value("#negative-prompt"), backend: this.selected,
      model: value("#model"), size: value("#size"), width: value("#width"), height: value("#height"),
      steps: value("#steps"), guidance_scale: value("#guidance"), scheduler: value("#scheduler"), seed: value("#seed"),
      num_images: value("#num-images"), output_format: value("#output-format"),
    };
  }

  // Fills the form from a settings object; what the current backends cannot take is left as it is and
  // named in the list returned ("backend flux-local", "model x", "scheduler y").
  apply(settings) {
    const skipped = [];
    const set = (id, value) => { if (value !== undefined && value !== null) $(id, this.form).value = String(value); };
    if (settings.backend && settings.backend !== this.selected) {
      const entry = this.backends.get(settings.backend);
      if (entry && !entry.input.disabled) {
        entry.input.checked = true;
        this.applyBackend();
      } else skipped.push(`backend ${settings.backend}`);
    }
    const entry = this.selectedEntry();
    if (settings.model && entry && settings.model !== $("#model", this.form).value) {
      if (entry.data.capabilities.models.includes(settings.model)) {
        $("#model", this.form).value = settings.model;
        this.applyModel();
      } else skipped.push(`model ${settings.model}`);
    }
    set("#prompt", settings.prompt);
    if (this.caps?.supports_negative_prompt !== false) set("#negative-prompt", settings.negative_prompt);
    if (settings.width && settings.height) {
      const key = `${settings.width}x${settings.height}`;
      const sizes = $("#size", this.form);
      const preset = [...sizes.options].some((option) => option.value === key);
      sizes.value = settings.size === "custom" || !preset ? "custom" : key;
      this.applySize();
      if (sizes.value === "custom") {
        set("#width", settings.width);
        set("#height", settings.height);
      }
    }
    set("#steps", settings.steps);
    if (this.caps?.supports_guidance) set("#guidance", settings.guidance_scale);
    if (settings.scheduler) {
      if (this.caps?.schedulers.includes(settings.scheduler)) set("#scheduler", settings.scheduler);
      else if (this.caps?.schedulers.length) skipped.push(`scheduler ${settings.scheduler}`);
    }
    if (settings.seed !== undefined && settings.seed !== "") set("#seed", settings.seed);
    set("#num-images", settings.num_images);
    if (settings.output_format && this.caps?.output_formats.includes(settings.output_format)) {
      set("#output-format", settings.output_format);
    }
    this.onChange();
    return skipped;
  }

  useSeed(seed) {
    if (seed === null || seed === undefined) return;
    const field = $("#seed", this.form);
    field.value = String(seed);
    field.focus();
  }

  rememberSeed(seed) {
    this.lastSeed = seed;
    const reuse = $("#seed-reuse", this.form);
    reuse.disabled = false;
    reuse.textContent = `Reuse ${seed}`;
  }

  // The request body for POST /api/jobs: only what the user chose and the backend uses.
  body() {
    const value = (id) => $(id, this.form).value.trim();
    const caps = this.caps;
    const body = {
      prompt: value("#prompt"),
      backend: this.selected,
      width: Number(value("#width")),
      height: Number(value("#height")),
      num_images: Number(value("#num-images") || 1),
      output_format: value("#output-format"),
    };
    if (caps.models.length > 1) body.model = value("#model");
    if (caps.supports_negative_prompt && value("#negative-prompt")) body.negative_prompt = value("#negative-prompt");
    if (value("#steps")) body.steps = Number(value("#steps"));
    if (caps.supports_guidance && value("#guidance")) body.guidance_scale = Number(value("#guidance"));
    if (caps.schedulers.length) body.scheduler = value("#scheduler");
    if (caps.supports_seed && value("#seed")) body.seed = Math.min(Number(value("#seed")), SEED_MAX);
    const loras = caps.supports_loras && this.loras ? this.loras.value() : [];
    if (loras.length) body.loras = loras;
    if (this.editor?.hasImages) {
      // The result takes the first image's size unless a custom size was chosen.
      if ($("#size", this.form).value !== "custom") { delete body.width; delete body.height; }
      Object.assign(body, this.editor.bodyFields());
    }
    return body;
  }

  // A 422 names the parameter: point at its field.
  markInvalid(param) {
    const ids = { width: "#width", height: "#height", steps: "#steps", guidance_scale: "#guidance", seed: "#seed",
      num_images: "#num-images", prompt: "#prompt", negative_prompt: "#negative-prompt", scheduler: "#scheduler",
      strength: "#strength", images: "#drop-zone", mask: "#mask-canvas" };
    for (const field of this.form.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
    const id = ids[param] || (param && param.startsWith("images[") ? "#drop-zone" : undefined);
    if (!id) return;
    if (id === "#width" || id === "#height") {
      $("#size", this.form).value = "custom";
      this.applySize();
    }
    $(id, this.form).setAttribute("aria-invalid", "true");
  }
}
