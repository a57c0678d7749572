"""The `sd` backend: Stable Diffusion 1.x / 2.x / SDXL through a local diffusers pipeline.

Modes (docs/editing.md): txt2img; img2img with `images[0]` and inpainting with a `mask`, by pipelines
made with `from_pipe` from the loaded one (they share its weights). A 9-channel inpainting checkpoint
(`unet.config.in_channels == 9`) is recognised and offered for inpainting only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagegen.backends.base import Capabilities, RunContext
from imagegen.backends.conditioning import Conditioning
from imagegen.backends.local import tiny_models
from imagegen.backends.local.base import LoadedPipeline, LocalPipelineBackend
from imagegen.backends.local.schedulers import SCHEDULER_NAMES, make_scheduler
from imagegen.config import Backend, Settings
from imagegen.generation import GenerationRequest, Mode
from imagegen.storage.lora_format import LoraFamily

#: The UNet cross-attention width of the built-in models (what their LoRAs must have been trained on).
_BUILTIN_CROSS_ATTENTION = {tiny_models.TINY_SD: 32, tiny_models.TINY_SDXL: 64}

#: What a checkpoint does by its UNet's input channels: 4 (latents) every mode; 9 (latents, masked
#: image latents and the mask: an inpainting checkpoint) inpainting only.
_MODES_BY_CHANNELS: dict[int, tuple[Mode, ...]] = {4: ("txt2img", "img2img", "inpaint"), 9: ("inpaint",)}


def _family_of(class_name: str | None, model_id: str) -> str:
    if class_name:
        return "sdxl" if "XL" in class_name else "sd"
    return "sdxl" if "xl" in model_id.lower() else "sd"


class StableDiffusionBackend(LocalPipelineBackend):
    id = Backend.SD.value

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.model_id)
        # The allowlist: SD_MODEL_ID first (the default), then SD_MODELS. One is loaded at a time;
        # `model_id` is the one loaded (or to load next).
        self.model_ids: tuple[str, ...] = tuple(dict.fromkeys((settings.model_id, *settings.models)))
        self._peeked: dict[str, dict[str, Any]] = {}  # a model's files do not change while the service runs

    # -- capabilities: known before loading, exact once the model is loaded -----------------------
    def default_model_id(self) -> str:
        # The rule of the base class, read from the allowlist: capabilities() are the default model's,
        # so they cannot be asked first.
        return self.default_model or self.model_ids[0]

    def capabilities(self) -> Capabilities:
        """The capabilities of the default model (what a request naming no model gets)."""
        return self.capabilities_for(self.default_model_id())

    def capabilities_for(self, model: str) -> Capabilities:
        return self._capabilities_from(self.load_details(model) or self._peek_config(model), model)

    def _peek_config(self, model: str) -> dict[str, Any]:
        """What can be learnt without loading weights: the pipeline class of a built-in model, the
        UNet's input channels of a local or cached one (never a download, never torch)."""
        if tiny_models.is_builtin(model):
            return {
                "pipeline_class": "StableDiffusionXLPipeline"
                if model == tiny_models.TINY_SDXL
                else "StableDiffusionPipeline",
                "native_size": 512 if model == tiny_models.TINY_SD_512 else 64,
                "unet_in_channels": 4,
            }
        if model in self._peeked:
            return self._peeked[model]
        from imagegen.backends.local.support import model_source
        from imagegen.errors import BackendUnavailableError

        try:
            source = model_source(model, self.settings)
        except BackendUnavailableError:
            return {}
        unet = source.read_json("unet/config.json")
        if unet is None:
            return {}  # not on disk yet: the load tells
        found: dict[str, Any] = {"unet_in_channels": unet.get("in_channels", 4)}
        vae = source.read_json("vae/config.json")
        if vae is not None and unet.get("sample_size") and vae.get("block_out_channels"):
            # What the load computes: latent size x the VAE's scale factor.
            found["native_size"] = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        self._peeked[model] = found
        return found

    def _capabilities_from(self, details: dict[str, Any], model: str) -> Capabilities:
        family = _family_of(details.get("pipeline_class"), model)
        native = details.get("native_size") or (1024 if family == "sdxl" else 512)
        channels = details.get("unet_in_channels", 4)
        modes = _MODES_BY_CHANNELS.get(channels, ("txt2img",))
        settings = self.settings
        return Capabilities(
            models=self.model_ids,
            default_width=native,
            default_height=native,
            size_multiple=8,
            min_size=64 if native >= 256 else 16,
            max_width=settings.max_width,
            max_height=settings.max_height,
            max_pixels=settings.max_pixels,
            default_steps=25 if family == "sd" else 30,
            max_steps=settings.max_steps,
            max_batch=8,
            supports_negative_prompt=True,
            supports_guidance=True,
            default_guidance=7.5 if family == "sd" else 5.0,
            schedulers=SCHEDULER_NAMES,
            default_scheduler="default",
            supports_loras=True,
            modes=modes,
            notes=("an inpainting checkpoint (9-channel UNet): inpainting only",) if channels == 9 else (),
        )

    def lora_family(self, model: str) -> LoraFamily:
        """sd or sdxl, with the UNet's cross-attention width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)
        from the loaded model or its config on disk; never loads or downloads anything."""
        loaded = self._loaded
        if loaded is not None and self.model_id == model:
            details = loaded.details
        else:
            details = self._peek_config(model)
            if not tiny_models.is_builtin(model):
                details = {**details, **self._unet_config(model)}
        width = details.get("cross_attention_dim", _BUILTIN_CROSS_ATTENTION.get(model))
        return LoraFamily(_family_of(details.get("pipeline_class"), model), width if isinstance(width, int) else None)

    def _unet_config(self, model: str) -> dict[str, Any]:
        from imagegen.backends.local.support import model_source
        from imagegen.errors import BackendUnavailableError

        try:
            source = model_source(model, self.settings)
        except BackendUnavailableError:
            return {}
        index = source.model_index() or {}
        unet = source.read_json("unet/config.json") or {}
        found: dict[str, Any] = {"cross_attention_dim": unet.get("cross_attention_dim")}
        if index.get("_class_name"):
            found["pipeline_class"] = index["_class_name"]
        return found

    def info(self) -> dict[str, Any]:
        details = self.load_details(self.model_id) or self._peek_config(self.model_id)
        return {"family": _family_of(details.get("pipeline_class"), self.model_id)}

    # -- loading ---------------------------------------------------------------------------------
    def load_pipeline(self) -> LoadedPipeline:
        from imagegen.backends.local.support import model_source, pick_device, pick_dtype, quiet_libraries

        quiet_libraries()
        from diffusers import AutoPipelineForText2Image

        from imagegen.backends.local.safety import SafetyChecker

        settings = self.settings
        source = model_source(self.model_id, settings)
        index = source.model_index() or {}
        device = pick_device(settings.device)
        dtype = pick_dtype(device, "sd")
        kwargs: dict[str, Any] = dict(source.kwargs)
        if "safety_checker" in index and not settings.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = AutoPipelineForText2Image.from_pretrained(source.location, dtype=dtype, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        safety = None
        if settings.safety_checker:
            safety = SafetyChecker.from_pipeline(pipe, self.model_id) or SafetyChecker.load(
                settings, self.model_id, device, dtype
            )
        elif getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        pipe = pipe.to(device)
        if safety is not None:
            safety.to(device)
        native = (
            int(pipe.default_sample_size * pipe.vae_scale_factor)
            if hasattr(pipe, "default_sample_size")
            else (int(pipe.unet.config.sample_size * pipe.vae_scale_factor))
        )
        details = {
            "pipeline_class": type(pipe).__name__,
            "native_size": native,
            "safety_checker": safety.source if safety is not None else None,
            "scheduler_config": dict(pipe.scheduler.config),
            "scheduler_class": type(pipe.scheduler).__name__,
            "cross_attention_dim": pipe.unet.config.cross_attention_dim,
            "unet_in_channels": int(pipe.unet.config.in_channels),
        }
        return LoadedPipeline(pipe, device, dtype, safety, details)

    def preview_layout(self, loaded: LoadedPipeline) -> str | None:
        from imagegen.backends.local.previews import SD

        return SD  # SD 1.x/2.x and SDXL: (batch, channels, height, width) latents

    # -- generation ------------------------------------------------------------------------------
    def pipeline_for(self, loaded: LoadedPipeline, mode: Mode) -> Any:
        """The loaded pipeline for txt2img; for img2img and inpaint one made from it with `from_pipe`
        (same components, no second copy of the weights; the dtype passed, or from_pipe casts to float32)."""
        if mode == "txt2img":
            return loaded.pipe
        pipe = loaded.derived.get(mode)
        if pipe is None:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForInpainting if mode == "inpaint" else AutoPipelineForImage2Image
            pipe = auto.from_pipe(loaded.pipe, dtype=loaded.dtype)
            pipe.set_progress_bar_config(disable=True)
            loaded.derived[mode] = pipe
        return pipe

    def run_pipeline(
        self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> Any:
        import torch

        from imagegen.backends.local.support import cpu_generators

        first = batch[0]
        pipe = self.pipeline_for(loaded, first.mode)
        seeds = [seed for request in batch for seed in request.seeds]
        prompts = [request.prompt for request in batch for _ in request.seeds]
        # All requests of a batch agree on having a negative prompt (it is part of the batch key):
        # SDXL treats "no negative prompt" (zeros) differently from an empty one.
        negatives = None
        if first.negative_prompt is not None:
            negatives = [request.negative_prompt or "" for request in batch for _ in request.seeds]
        scheduler_config = loaded.details["scheduler_config"]
        scheduler = make_scheduler(first.scheduler, scheduler_config)
        if scheduler is None:
            import diffusers

            scheduler = getattr(diffusers, loaded.details["scheduler_class"]).from_config(scheduler_config)
        pipe.scheduler = scheduler  # a fresh scheduler per call: schedulers carry per-call state
        arguments: dict[str, Any] = {}
        if first.mode == "txt2img":
            arguments.update(width=first.width, height=first.height)
        else:
            # The init image is already at the output size (conditioning.fit); the pipeline runs
            # int(steps x strength) of the steps, starting from the noised init image.
            arguments.update(image=inputs.init, strength=first.strength)
            if first.mode == "inpaint":
                arguments.update(mask_image=inputs.mask, width=first.width, height=first.height)
        with torch.inference_mode():
            output = pipe(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=cpu_generators(seeds),
                output_type="pt",  # decoded on the device; finisher.py takes it from there
                callback_on_step_end=self.step_callback(
                    ctx, first.denoising_steps or 1, self.batch_preview(loaded, batch)
                ),
                **arguments,
            )
        return output.images
