// Wiring: ask for the key when the service needs one, then load the backends and limits, and
// start the form, this tab's jobs, the queue view and the gallery.

import { api, apiKey, onUnauthorized, pageConfig } from "./api.js";
import { $, announce } from "./dom.js";
import { EditPanel } from "./edit.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobList } from "./jobs.js";
import { LoraPicker } from "./loras.js";
import { QueueView } from "./queue.js";
import { BlobUrls } from "./results.js";

const BACKENDS_POLL_MS = 10_000;
let backendsTimer = null;
let started = false;

const loras = new LoraPicker($("#lora-field"));
const editor = new EditPanel($("#edit"));
const form = new GenerateForm($("#generate-form"), { onSubmit: submit, loras, editor });
const reuseSeed = (seed) => { form.useSeed(seed); announce(`Seed ${seed} will be used for the next generation`); };
const gallery = new Gallery($("#gallery"), { onReuseSeed: reuseSeed });
const queue = new QueueView($("#queue"), { onChange: showQueueCounts });
const jobs = new JobList($("#jobs"), {
  blobs: new BlobUrls(),
  onReuseSeed: reuseSeed,
  onUseAsInput: (filename) => editor.useResult(filename).catch((error) => announce(`Could not use it: ${error.message}`)),
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

$("#forget-key").addEventListener("click", () => {
  apiKey.clear();
  showAuth("Key forgotten.");
});

(async () => {
  const config = await pageConfig().catch(() => ({ auth_required: false }));
  if (config.auth_required && !apiKey.get()) showAuth();
  else start();
})();
