// "Use these settings": the form's values as one plain object, made from a job and one of its images, from
// the parameters embedded in an image file (this service's JSON, or A1111's "parameters" text), or kept in
// local storage so that the form survives a reload. GenerateForm.apply() puts such an object in the form.
//
// Settings: { prompt, negative_prompt, backend, model, width, height, steps, guidance_scale, scheduler,
//             seed, num_images, output_format } — any may be missing.

const STORAGE_ITEM = "imagegen.form";

// A1111 sampler names (and the legacy "... Karras" forms) -> this service's scheduler names.
const SAMPLERS = {
  "dpm++ 2m": "dpmpp_2m", "dpm++ sde": "dpmpp_sde", "dpm++ 2m sde": "dpmpp_2m_sde", "euler a": "euler_a",
  "euler": "euler", "heun": "heun", "dpm2": "dpm2", "dpm2 a": "dpm2_a", "ddim": "ddim", "plms": "pndm",
  "unipc": "unipc", "lcm": "lcm", "deis": "deis",
};
const KARRAS = { dpmpp_2m: "dpmpp_2m_karras", dpmpp_2m_sde: "dpmpp_2m_sde_karras", euler: "euler_karras" };

function number(value) {
  const parsed = Number(value);
  return value === null || value === undefined || value === "" || !Number.isFinite(parsed) ? undefined : parsed;
}

function clean(settings) {
  return Object.fromEntries(Object.entries(settings).filter(([, value]) => value !== undefined && value !== null && value !== ""));
}

// From a job body (GET /api/jobs) and one of its images: what made that image.
export function fromJob(job, image) {
  const p = job.parameters || {};
  return clean({
    prompt: p.prompt, negative_prompt: p.negative_prompt, backend: job.backend, model: job.model,
    width: image?.width ?? p.width, height: image?.height ?? p.height, steps: p.steps,
    guidance_scale: p.guidance_scale, scheduler: p.scheduler, seed: image?.seed ?? p.seeds?.[0],
    output_format: p.output_format,
  });
}

// From the `imagegen` JSON this service embeds in every file (storage/metadata.py).
export function fromMetadata(meta) {
  return clean({
    prompt: meta.prompt, negative_prompt: meta.negative_prompt, backend: meta.backend, model: meta.model,
    width: number(meta.width), height: number(meta.height), steps: number(meta.steps),
    guidance_scale: number(meta.guidance_scale), scheduler: meta.scheduler, seed: number(meta.seed),
  });
}

// A1111's "parameters" text: prompt lines, "Negative prompt: ...", then "Key: value, ..." on the last line.
export function parseA1111(text) {
  const lines = text.trim().split("\n");
  const field = /\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
  const fields = {};
  const last = lines[lines.length - 1] || "";
  const found = [...last.matchAll(field)].filter((match) => match[0].trim());
  if (found.length >= 3) {
    lines.pop();
    for (const [, key, raw] of found) {
      let value = raw.trim();
      if (value.startsWith('"') && value.endsWith('"')) {
        try { value = JSON.parse(value); } catch { /* kept as written */ }
      }
      fields[key.trim()] = value;
    }
  }
  const prompt = [];
  const negative = [];
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) negative.push(line.slice("Negative prompt:".length).trim());
    else if (negative.length) negative.push(line);
    else prompt.push(line);
  }
  return { prompt: prompt.join("\n").trim(), negative: negative.join("\n").trim(), fields };
}

export function schedulerFor(sampler, scheduleType) {
  if (!sampler) return undefined;
  let name = sampler.trim().toLowerCase();
  let karras = (scheduleType || "").toLowerCase() === "karras";
  if (name.endsWith(" karras")) {
    name = name.slice(0, -" karras".length);
    karras = true;
  }
  const base = SAMPLERS[name] || name.replaceAll(" ", "_");  // this service writes its own names there
  return karras && KARRAS[base] ? KARRAS[base] : base;
}

export function fromA1111(text) {
  const { prompt, negative, fields } = parseA1111(text);
  const size = /^(\d+)x(\d+)$/.exec(fields.Size || "");
  return clean({
    prompt, negative_prompt: negative, model: fields.Model, backend: fields.Backend,
    width: size ? Number(size[1]) : undefined, height: size ? Number(size[2]) : undefined,
    steps: number(fields.Steps), guidance_scale: number(fields["CFG scale"]),
    scheduler: schedulerFor(fields.Sampler, fields["Schedule type"]), seed: number(fields.Seed),
  });
}

// The form's values across reloads (local storage: this browser only; no key, nothing secret).
export const memory = {
  load() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_ITEM) || "null");
      return saved && typeof saved === "object" ? saved : null;
    } catch {
      return null;
    }
  },
  save(settings) {
    try { localStorage.setItem(STORAGE_ITEM, JSON.stringify(settings)); } catch { /* full or disabled */ }
  },
  clear() { localStorage.removeItem(STORAGE_ITEM); },
};
