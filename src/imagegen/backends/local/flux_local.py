"""The `flux-local` backend: FLUX.2 [klein] and FLUX.1 [schnell]/[dev] through local diffusers pipelines.

The pipeline class comes from the model's own model_index.json (DiffusionPipeline picks it), and
what the model accepts comes from its configs: klein's `is_distilled`, FLUX.1's `guidance_embeds`.
Parameters a model does not use are reported as ignored, never faked.

Modes (docs/editing.md): FLUX.2 [klein] edits with up to four reference images (`image=` list) and
inpaints (Flux2KleinInpaintPipeline); FLUX.1 does img2img and inpainting (FluxImg2ImgPipeline,
FluxInpaintPipeline). The pipelines of the other modes are made with `from_pipe` from the loaded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagegen.backends.base import BackendHealth, Capabilities, RunContext
from imagegen.backends.conditioning import Conditioning
from imagegen.backends.local import tiny_models
from imagegen.backends.local.base import LoadedPipeline, LocalPipelineBackend
from imagegen.config import Backend, Settings
from imagegen.errors import BackendUnavailableError, InvalidParameterError
from imagegen.generation import GenerationParams, GenerationRequest, Mode
from imagegen.storage.lora_format import LoraFamily

KLEIN = "Flux2KleinPipeline"
FLUX1 = "FluxPipeline"
SUPPORTED_PIPELINES = (KLEIN, FLUX1)
#: What each family does with images, and the pipeline class of each derived mode.
MODES: dict[str, tuple[Mode, ...]] = {KLEIN: ("txt2img", "edit", "inpaint"), FLUX1: ("txt2img", "img2img", "inpaint")}
DERIVED: dict[tuple[str, str], str] = {
    (KLEIN, "inpaint"): "Flux2KleinInpaintPipeline",
    (FLUX1, "img2img"): "FluxImg2ImgPipeline",
    (FLUX1, "inpaint"): "FluxInpaintPipeline",
}
#: FLUX.2 [klein] takes up to four reference images (model card; BFL's klein endpoints alike), each
#: at least 64 px a side and at most 8:1 (Flux2ImageProcessor.check_image_input).
KLEIN_MAX_REFERENCES = 4
KLEIN_MIN_REFERENCE_SIDE = 64
KLEIN_MAX_REFERENCE_RATIO = 8

#: FLUX latents are packed in 2x2 patches of a VAE with scale factor 8: sizes in multiples of 16.
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class FluxProfile:
    """What one FLUX model accepts and recommends (model cards of BFL and diffusers' examples)."""

    pipeline_class: str
    variant: str
    #: "none": step/guidance-distilled, guidance_scale ignored; "cfg": classifier-free guidance
    #: (klein base, two transformer passes per step); "embedded": FLUX.1 [dev]'s guidance embedding.
    guidance: str
    default_guidance: float | None
    default_steps: int
    max_sequence_length: int
    native_size: int = 1024

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline_class": self.pipeline_class,
            "variant": self.variant,
            "guidance": self.guidance,
            "default_steps": self.default_steps,
            "max_sequence_length": self.max_sequence_length,
            "native_size": self.native_size,
        }


def profile_for(
    model_id: str,
    index: dict[str, Any] | None,
    transformer_config: dict[str, Any] | None,
    vae_config: dict[str, Any] | None,
) -> FluxProfile:
    """The profile from the model's configs; where they are not on disk yet (a hub model before its
    first download), a guess from the repository name that the loaded configs later replace."""
    name = model_id.lower()
    class_name = (index or {}).get("_class_name")
    if class_name is None:
        class_name = FLUX1 if ("flux.1" in name or "flux1" in name) else KLEIN
    native = int((vae_config or {}).get("sample_size") or 1024)
    native = max(SIZE_MULTIPLE, native - native % SIZE_MULTIPLE)
    if class_name == KLEIN:
        distilled = (index or {}).get("is_distilled")
        if distilled is None:
            distilled = "base" not in name
        if distilled:
            # Model card: 4 steps, guidance 1.0 (i.e. none): klein is step- and guidance-distilled.
            return FluxProfile(KLEIN, "flux2-klein", "none", None, 4, 512, native)
        return FluxProfile(KLEIN, "flux2-klein-base", "cfg", 4.0, 50, 512, native)
    if class_name == FLUX1:
        embeds = (transformer_config or {}).get("guidance_embeds")
        if embeds is None:
            embeds = "schnell" not in name
        if embeds:
            # FLUX.1 [dev] model card: guidance 3.5, 50 steps, 512 text tokens.
            return FluxProfile(FLUX1, "flux1-dev", "embedded", 3.5, 50, 512, native)
        # FLUX.1 [schnell] model card: guidance 0, 4 steps, 256 text tokens.
        return FluxProfile(FLUX1, "flux1-schnell", "none", None, 4, 256, native)
    raise BackendUnavailableError(
        f"'{model_id}' is a {class_name}, not a FLUX model that flux-local runs "
        f"({', '.join(SUPPORTED_PIPELINES)}); Stable Diffusion models belong to the sd backend (SD_MODEL_ID)"
    )


# What the built-in tiny models' configs say, for capabilities before they are first built.
_BUILTIN_CONFIGS: dict[str, tuple[dict[str, Any] | None, ...]] = {
    tiny_models.TINY_FLUX2_KLEIN: ({"_class_name": KLEIN, "is_distilled": True}, None, {"sample_size": 64}),
    tiny_models.TINY_FLUX: ({"_class_name": FLUX1}, {"guidance_embeds": False}, {"sample_size": 64}),
}


class FluxLocalBackend(LocalPipelineBackend):
    id = Backend.FLUX_LOCAL.value
    standalone_checker = True  # FLUX models ship no safety checker

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.flux_model_id)
        self._peeked: FluxProfile | None = None

    def refresh(self) -> None:
        """Read the model's configs again (they may have been pulled into the cache since)."""
        super().refresh()
        self._peeked = None

    # -- what the model accepts: from its configs on disk, exact once loaded ----------------------
    def profile(self) -> FluxProfile:
        known = (self.load_details(self.model_id) or {}).get("profile")
        if isinstance(known, FluxProfile):
            return known
        if self._peeked is not None:
            return self._peeked
        configs, on_disk = self._configs_on_disk()
        try:
            profile = profile_for(self.model_id, *configs)
        except BackendUnavailableError:
            # Not a FLUX model: the load reports it; until then the name-based guess stands.
            profile = profile_for(self.model_id, None, None, None)
            on_disk = False
        if on_disk:
            self._peeked = profile  # a model's files do not change while the service runs
        return profile

    def _configs_on_disk(self) -> tuple[tuple[dict[str, Any] | None, ...], bool]:
        """(model_index, transformer config, vae config) without importing torch or downloading."""
        from imagegen.backends.local.support import ModelSource, model_source

        names = ("model_index.json", "transformer/config.json", "vae/config.json")
        if tiny_models.is_builtin(self.model_id):
            folder = tiny_models.builtin_path(self.settings.model_dir, self.model_id)
            if not (folder / tiny_models.COMPLETE_MARKER).exists():
                # Not built yet (it is built on the first load, which imports torch).
                return _BUILTIN_CONFIGS[self.model_id], False
            built = ModelSource(str(folder), True, {})
            return tuple(built.read_json(name) for name in names), True
        try:
            source = model_source(self.model_id, self.settings)
        except BackendUnavailableError:
            return (None, None, None), False
        configs = tuple(source.read_json(name) for name in names)
        return configs, configs[0] is not None

    def capabilities(self) -> Capabilities:
        profile = self.profile()
        settings = self.settings
        notes = ["negative_prompt is not used by FLUX pipelines (reported in ignored_parameters)"]
        if profile.guidance == "none":
            notes.append(f"{profile.variant} is guidance-distilled: guidance_scale is ignored")
        elif profile.guidance == "embedded":
            notes.append("guidance_scale is FLUX.1 [dev]'s embedded (distilled) guidance, not classifier-free guidance")
        return Capabilities(
            models=(self.model_id,),
            default_width=profile.native_size,
            default_height=profile.native_size,
            size_multiple=SIZE_MULTIPLE,
            min_size=64 if profile.native_size >= 256 else SIZE_MULTIPLE,
            max_width=settings.max_width,
            max_height=settings.max_height,
            max_pixels=settings.max_pixels,
            default_steps=profile.default_steps,
            max_steps=settings.max_steps,
            max_batch=4,
            supports_negative_prompt=False,
            supports_guidance=profile.guidance != "none",
            default_guidance=profile.default_guidance,
            schedulers=(),
            default_scheduler=None,
            supports_loras=True,
            notes=tuple(notes),
            modes=MODES[profile.pipeline_class],
            max_input_images=KLEIN_MAX_REFERENCES if profile.pipeline_class == KLEIN else 0,
        )

    def lora_family(self, model: str) -> LoraFamily:
        """flux2 (klein) or flux1, from the model's pipeline class."""
        return LoraFamily("flux2" if self.profile().pipeline_class == KLEIN else "flux1")

    def resolve(self, params: GenerationParams) -> GenerationRequest:
        """The service-wide checks, then what klein's pipeline refuses in a reference (a 422 here, not
        a failed job later)."""
        request = super().resolve(params)
        if request.mode == "edit":
            for index, image in enumerate(request.images):
                small = min(image.width, image.height) < KLEIN_MIN_REFERENCE_SIDE
                if small or max(image.width / image.height, image.height / image.width) > KLEIN_MAX_REFERENCE_RATIO:
                    raise InvalidParameterError(
                        f"images[{index}] must be at least {KLEIN_MIN_REFERENCE_SIDE} px a side and at most "
                        f"{KLEIN_MAX_REFERENCE_RATIO}:1 to be a FLUX.2 [klein] reference",
                        param="images",
                    )
        return request

    def info(self) -> dict[str, Any]:
        profile = self.profile()
        return {"family": "flux", "variant": profile.variant, "guidance": profile.guidance}

    def health(self) -> BackendHealth:
        health = super().health()
        profile = health.details.pop("profile", None)
        if isinstance(profile, FluxProfile):
            health.details.update(profile.to_dict())
        return health

    # -- loading ---------------------------------------------------------------------------------
    def pick_dtype(self, device: str) -> Any:  # a torch.dtype
        """SD_FLUX_DTYPE, or the FLUX rule (bf16 on CUDA, fp32 elsewhere). Never float16: FLUX
        overflows in fp16 and gives NaN/black images (diffusers #9096)."""
        import torch

        from imagegen.backends.local.support import pick_dtype

        choice = self.settings.flux_dtype
        if choice == "auto":
            return pick_dtype(device, "flux")
        if choice == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise BackendUnavailableError("SD_FLUX_DTYPE=bfloat16 but this GPU has no bfloat16 support: use auto")
        return getattr(torch, choice)

    def load_pipeline(self) -> LoadedPipeline:
        from imagegen.backends.local.support import model_source, pick_device, quiet_libraries

        quiet_libraries()  # before diffusers' first import: some notices print at import time
        from diffusers import DiffusionPipeline

        settings = self.settings
        source = model_source(self.model_id, settings)
        index = source.model_index()
        if index is not None and index.get("_class_name") not in SUPPORTED_PIPELINES:
            profile_for(self.model_id, index, None, None)  # raises the "not a FLUX model" message
        device = pick_device(settings.device)
        dtype = self.pick_dtype(device)
        # DiffusionPipeline reads model_index.json and builds the class it names.
        pipe = DiffusionPipeline.from_pretrained(source.location, dtype=dtype, **source.kwargs)
        return self.prepare(pipe, device, dtype)

    def prepare(self, pipe: Any, device: str, dtype: Any) -> LoadedPipeline:
        """Place a constructed FLUX pipeline on its device with the memory options and the safety
        checker; what the load decided goes to /health. (bench/gpu_flux.py calls this directly.)"""
        from imagegen.backends.local.safety import SafetyChecker

        settings = self.settings
        class_name = type(pipe).__name__
        if class_name not in SUPPORTED_PIPELINES:
            profile_for(self.model_id, {"_class_name": class_name}, None, None)  # raises
        profile = profile_for(
            self.model_id,
            {"_class_name": class_name, "is_distilled": getattr(pipe.config, "is_distilled", None)},
            dict(pipe.transformer.config),
            dict(pipe.vae.config),
        )
        pipe.set_progress_bar_config(disable=True)
        if settings.flux_vae_tiling:
            pipe.vae.enable_tiling()  # only images larger than the VAE's tile size are tiled
        # Model CPU offload needs an accelerator (accelerate raises without one).
        offload = settings.flux_cpu_offload and device != "cpu"
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
        safety = SafetyChecker.load(settings, self.model_id, device, dtype) if settings.safety_checker else None
        details = {
            "profile": profile,
            "scheduler_config": dict(pipe.scheduler.config),
            "safety_checker": safety.source if safety is not None else None,
            "vae_tiling": settings.flux_vae_tiling,
            "vae_tile_size": getattr(pipe.vae, "tile_sample_min_size", None) if settings.flux_vae_tiling else None,
            "cpu_offload": offload,
        }
        if settings.flux_cpu_offload and not offload:
            details["cpu_offload_note"] = "SD_FLUX_CPU_OFFLOAD needs a GPU or MPS device; ignored on cpu"
        return LoadedPipeline(pipe, device, dtype, safety, details)

    def preview_layout(self, loaded: LoadedPipeline) -> str | None:
        from imagegen.backends.local.previews import FLUX1, FLUX2

        profile: FluxProfile = loaded.details["profile"]
        return FLUX2 if profile.pipeline_class == KLEIN else FLUX1

    # -- generation ------------------------------------------------------------------------------
    def pipeline_for(self, loaded: LoadedPipeline, mode: Mode) -> Any:
        """The loaded pipeline (txt2img, klein's reference editing), or one made from it with
        `from_pipe` for img2img and inpainting: the same components, the dtype passed (from_pipe
        would cast to float32 otherwise)."""
        profile: FluxProfile = loaded.details["profile"]
        class_name = DERIVED.get((profile.pipeline_class, mode))
        if class_name is None:
            return loaded.pipe
        pipe = loaded.derived.get(mode)
        if pipe is None:
            import diffusers

            pipe = getattr(diffusers, class_name).from_pipe(loaded.pipe, dtype=loaded.dtype)
            pipe.set_progress_bar_config(disable=True)
            loaded.derived[mode] = pipe
        return pipe

    def run_pipeline(
        self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> Any:
        import torch

        from imagegen.backends.local.support import cpu_generators

        profile: FluxProfile = loaded.details["profile"]
        first = batch[0]
        pipe = self.pipeline_for(loaded, first.mode)
        seeds = [seed for request in batch for seed in request.seeds]
        prompts = [request.prompt for request in batch for _ in request.seeds]
        # A fresh scheduler per call: schedulers carry per-call state (timesteps, step index).
        pipe.scheduler = type(loaded.pipe.scheduler).from_config(loaded.details["scheduler_config"])
        guidance: float | None
        if profile.guidance == "none":
            # The value the model card uses; klein warns about anything > 1 and then ignores it.
            guidance = 1.0 if profile.pipeline_class == KLEIN else 0.0
        else:
            guidance = first.guidance_scale if first.guidance_scale is not None else profile.default_guidance
        steps = first.steps or profile.default_steps
        arguments: dict[str, Any] = {}
        if first.mode == "edit":
            arguments["image"] = list(inputs.references)  # klein: every reference, in order
        elif first.mode in ("img2img", "inpaint"):
            arguments.update(image=inputs.init, strength=first.strength)
            if first.mode == "inpaint":
                arguments["mask_image"] = inputs.mask
        total = int(steps * first.strength) if first.strength is not None else steps
        with torch.inference_mode():
            output = pipe(
                prompt=prompts,  # by keyword: klein's first positional argument is `image`
                width=first.width,
                height=first.height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=cpu_generators(seeds),
                max_sequence_length=profile.max_sequence_length,
                output_type="pt",  # decoded on the device; finisher.py takes it from there
                callback_on_step_end=self.step_callback(ctx, total, self.batch_preview(loaded, batch)),
                **arguments,
            )
        return output.images
