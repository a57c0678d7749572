// Wiring: ask for the key when the service needs one, then load the backends and limits, and
// start the form (restored from the last visit), this tab's jobs, the queue view, the gallery, and the
// page-wide drop of an image whose settings fill the form.

import { api, apiKey, onUnauthorized, pageConfig } from "./api.js";
import { $, announce } from "./dom.js";
import { EditPanel } from "./edit.js";
import { watchDrops } from "./dropzone.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobList } from "./jobs.js";
import { LoraPicker } from "./loras.js";
import { QueueView } from "./queue.js";
import { BlobUrls } from "./results.js";
import { fromJob, memory } from "./settings.js";

const BACKENDS_POLL_MS = 10_000;
const SAVE_DELAY_MS = 300;
let backendsTimer = null;
let started = false;
let restored = false;
let saveTimer = null;

const loras = new LoraPicker($("#lora-field"));
const editor = new EditPanel($("#edit"));
const form = new GenerateForm($("#generate-form"), {
  onSubmit: submit,
  loras,
  editor,
  // The form survives a reload: saved (debounced) whenever it changes, restored once the backends are known.
  onChange() {
    if (!restored) return;
    clearTimeout(saveTimer);
    saveTimer = setTimeout(() => memory.save(form.values()), SAVE_DELAY_MS);
  },
});
const reuseSeed = (seed) => { form.useSeed(seed); announce(`Seed ${seed} will be used for the next generation`); };

function useSettings(settings, source) {
  const skipped = form.apply(settings);
  const note = skipped.length ? ` (not available here: ${skipped.join(", ")})` : "";
  $("#read-image-status").textContent = `Settings from ${source}${note}.`;
  announce(`The form now has the settings from ${source}${note}`);
  $("#create").scrollIntoView({ block: "start", behavior: "smooth" });
  $("#prompt").focus({ preventScroll: true });
}
const useJobSettings = (job, image) => useSettings(fromJob(job, image), `the image with seed ${image.seed}`);

const gallery = new Gallery($("#gallery"), { onReuseSeed: reuseSeed, onUseSettings: useJobSettings });
const queue = new QueueView($("#queue"), { onChange: showQueueCounts });
const jobs = new JobList($("#jobs"), {
  blobs: new BlobUrls(),
  onReuseSeed: reuseSeed,
  onUseAsInput: (filename) => editor.useResult(filename).catch((error) => announce(`Could not use it: ${error.message}`)),
  onUseSettings: useJobSettings,
  onFinished(job) {
    $("#results-empty").hidden = true;
    const seeds = job.parameters?.seeds;
    if (job.status === "succeeded" && seeds?.length) form.rememberSeed(seeds[0]);
    if (job.status === "succeeded" && gallery.onFirstPage) gallery.load();
    queue.refresh();
  },
});

function showQueueCounts({ running, queued }) {
  $("#queue-counts").textContent = `${running} running · ${queued} queued`;
}

async function submit(body) {
  const button = $("#generate");
  const error = $("#form-error");
  error.textContent = "";
  form.markInvalid(null);
  button.disabled = true;
  try {
    const accepted = await api("api/jobs", { method: "POST", body });
    $("#results-empty").hidden = true;
    jobs.add(accepted, body);
    queue.refresh();
  } catch (failure) {
    if (failure.status === 401) return;
    error.textContent = failure.message;
    form.markInvalid(failure.param);
  } finally {
    button.disabled = !form.selectedEntry();
  }
}

async function loadBackends() {
  const listing = await api("api/backends");
  form.setBackends(listing.backends, listing.default);
  if (!restored) {
    const saved = memory.load();
    if (saved) form.apply(saved);
    restored = true;
  }
  const current = listing.backends.find((backend) => backend.default);
  $("#service-status").textContent = current ? `Default backend ${current.id}: ${current.state}` : "";
}

function showAuth(message) {
  started = false;
  clearInterval(backendsTimer);
  queue.stop();
  $("#app").hidden = true;
  $("#forget-key").hidden = true;
  $("#auth").hidden = false;
  $("#auth-error").textContent = message || "";
  $("#api-key").value = "";
  $("#api-key").focus();
}

async function start() {
  try {
    const info = await api("info");
    form.setLimits(info.limits);
    await loras.load();
    await loadBackends();
  } catch (error) {
    if (error.status !== 401) {
      $("#service-status").textContent = `The service did not answer (${error.message}); trying again…`;
      setTimeout(start, 5000);
    }
    return;
  }
  started = true;
  clearInterval(backendsTimer);  // a second start (the key form sent twice) must not double the polling
  $("#auth").hidden = true;
  $("#app").hidden = false;
  $("#forget-key").hidden = !apiKey.get();
  queue.start();
  gallery.load();
  backendsTimer = setInterval(() => { if (!document.hidden) loadBackends().catch(() => {}); }, BACKENDS_POLL_MS);
  if (!$("#prompt").value) $("#prompt").focus();
}

onUnauthorized(() => {
  if (apiKey.get()) apiKey.clear();
  showAuth(started ? "The key is no longer accepted: enter it again." : "That key was not accepted.");
});

$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) return;
  apiKey.set(key);
  $("#auth-error").textContent = "";
  start();
});

watchDrops({
  onSettings: (settings, name) => useSettings(settings, name),
  onNothing: (message) => { $("#read-image-status").textContent = message; announce(message); },
});

$("#forget-key").addEventListener("click", () => {
  apiKey.clear();
  showAuth("Key forgotten.");
});

(async () => {
  const config = await pageConfig().catch(() => ({ auth_required: false }));
  if (config.auth_required && !apiKey.get()) showAuth();
  else start();
})();
