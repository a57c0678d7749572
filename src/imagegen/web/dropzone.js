// Images dropped on the page (or chosen with "Settings from an image…"): their embedded parameters fill the
// form. The file is read in the browser (pnginfo.js); nothing is uploaded.

import { $ } from "./dom.js";
import { readImageInfo } from "./pnginfo.js";
import { fromA1111, fromMetadata } from "./settings.js";

// The settings an image carries (this service's JSON first: it is exact), or null.
export async function settingsOfFile(file) {
  const info = await readImageInfo(file);
  if (info.imagegen) return fromMetadata(info.imagegen);
  if (info.parameters) return fromA1111(info.parameters);
  return null;
}

export function watchDrops({ onSettings, onNothing }) {
  const overlay = $("#drop-overlay");
  const input = $("#image-file");
  let depth = 0;
  const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");

  async function read(file) {
    if (!file) return;
    try {
      const settings = await settingsOfFile(file);
      if (settings) onSettings(settings, file.name);
      else onNothing(`${file.name} carries no generation settings (only PNG, JPEG or WebP files made by this service or A1111 do).`);
    } catch (error) {
      onNothing(`Could not read ${file.name}: ${error.message}`);
    }
  }

  document.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    depth += 1;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (carriesFiles(event)) event.preventDefault();  // without this the browser opens the file instead
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    overlay.hidden = true;
    // A drop zone of its own took it (the edit mode's images): those files are inputs, not settings.
    if (!carriesFiles(event) || event.defaultPrevented) return;
    event.preventDefault();
    read(event.dataTransfer.files[0]);
  });
  $("#read-image").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    read(input.files[0]);
    input.value = "";
  });
}
