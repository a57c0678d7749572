"""The `sd` backend: Stable Diffusion 1.x / 2.x / SDXL through a local diffusers pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagegen.backends.base import Capabilities, RunContext
from imagegen.backends.local import tiny_models
from imagegen.backends.local.base import LoadedPipeline, LocalPipelineBackend
from imagegen.backends.local.schedulers import SCHEDULER_NAMES, make_scheduler
from imagegen.config import Backend, Settings
from imagegen.generation import GenerationRequest


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

    # -- capabilities: known before loading, exact once the model is loaded -----------------------
    def capabilities(self) -> Capabilities:
        """The capabilities of the default model (what a request naming no model gets)."""
        return self.capabilities_for(self.default_model or self.model_ids[0])

    def capabilities_for(self, model: str) -> Capabilities:
        return self._capabilities_from(self.load_details(model) or self._peek_config(model), model)

    def _peek_config(self, model: str) -> dict[str, Any]:
        """What can be learnt without loading weights: the pipeline class of a built-in or local model."""
        if tiny_models.is_builtin(model):
            return {
                "pipeline_class": "StableDiffusionXLPipeline"
                if model == tiny_models.TINY_SDXL
                else "StableDiffusionPipeline",
                "native_size": 64,
            }
        return {}

    def _capabilities_from(self, details: dict[str, Any], model: str) -> Capabilities:
        family = _family_of(details.get("pipeline_class"), model)
        native = details.get("native_size") or (1024 if family == "sdxl" else 512)
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
        )

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
        }
        return LoadedPipeline(pipe, device, dtype, safety, details)

    # -- generation ------------------------------------------------------------------------------
    def run_pipeline(self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext) -> Any:
        import torch

        from imagegen.backends.local.support import cpu_generators

        pipe = loaded.pipe
        first = batch[0]
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
        with torch.inference_mode():
            output = pipe(
                prompt=prompts,
                negative_prompt=negatives,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=cpu_generators(seeds),
                output_type="np",
                callback_on_step_end=self.step_callback(ctx, first.steps or 1),
            )
        return output.images
