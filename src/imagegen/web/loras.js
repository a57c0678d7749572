// The LoRA picker: the adapters in SD_LORA_DIR (GET /api/loras) that fit the chosen backend and
// model, each with a checkbox and a weight. Hidden where the backend takes no LoRAs or none fits.
// Choices are kept by name while the list is redrawn (a backend switch and back keeps them).

import { api } from "./api.js";
import { $, h } from "./dom.js";

export class LoraPicker {
  constructor(fieldset) {
    this.fieldset = fieldset;
    this.list = $("#lora-list", fieldset);
    this.entries = [];
    this.rows = new Map();
    this.target = null;
    this.max = 4;
    this.counter = 0;
  }

  setLimit(max) {
    if (max) this.max = max;
    $("#lora-hint", this.fieldset).textContent = `Up to ${this.max}. Weight 1: as trained; 0: no effect.`;
  }

  async load() {
    try {
      this.entries = (await api("api/loras")).loras;
    } catch (error) {
      if (error.status === 401) throw error;
      this.entries = [];
    }
    this.render();
  }

  setTarget(backend, model, supported) {
    this.target = supported ? { backend, model } : null;
    this.render();
  }

  render() {
    const target = this.target;
    const fitting = target
      ? this.entries.filter((entry) => entry.fits.some((fit) => fit.backend === target.backend && fit.model === target.model))
      : [];
    this.fieldset.hidden = fitting.length === 0;
    for (const entry of fitting) if (!this.rows.has(entry.name)) this.rows.set(entry.name, this.row(entry));
    this.list.replaceChildren(...fitting.map((entry) => this.rows.get(entry.name).element));
    this.shown = new Set(fitting.map((entry) => entry.name));
  }

  row(entry) {
    // Names may hold spaces and dots: ids are numbered, the name is only ever text.
    const id = `lora-${++this.counter}`;
    const check = h("input", { type: "checkbox", id, class: "lora-check" });
    const weight = h("input", {
      type: "number", min: "-10", max: "10", step: "0.05", value: "1", inputmode: "decimal",
      class: "lora-weight", "aria-label": `Weight of ${entry.name}`,
    });
    const element = h("div", { class: "lora", "data-name": entry.name },
      check, h("label", { for: id }, entry.name), h("span", { class: "hint" }, entry.label), weight);
    check.addEventListener("change", () => this.checkCount());
    return { name: entry.name, check, weight, element };
  }

  checkCount() {
    const chosen = this.value().length;
    const first = this.list.querySelector(".lora-check");
    if (first) first.setCustomValidity(chosen > this.max ? `At most ${this.max} LoRAs per request.` : "");
  }

  // The request's `loras`: the checked ones among those shown, in list order.
  value() {
    return [...this.rows.values()]
      .filter((row) => this.shown?.has(row.name) && row.check.checked)
      .map((row) => ({ name: row.name, weight: Number(row.weight.value || 1) }));
  }
}
