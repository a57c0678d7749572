"""The NSFW safety checker, run by the service itself after every local generation.

The SD 1.x pipelines run their own checker and hand back black frames; SD 2.x, SDXL and FLUX ship
none. Running one checker here, the same way for every family, gives one policy: each image gets an
`nsfw` flag, and a flagged image is never returned as content.
"""

from __future__ import annotations

from typing import Any

from imagegen.backends.local import tiny_models
from imagegen.backends.local.support import model_source
from imagegen.config import Settings


class SafetyChecker:
    """CLIP-based checker (diffusers' StableDiffusionSafetyChecker) plus its image processor."""

    def __init__(self, checker: Any, processor: Any, source: str) -> None:
        self.checker = checker
        self.processor = processor
        self.source = source

    @classmethod
    def from_pipeline(cls, pipe: Any, source: str) -> SafetyChecker | None:
        """Take the pipeline's own checker (SD 1.x) and detach it, so the pipeline does not also run it."""
        checker = getattr(pipe, "safety_checker", None)
        processor = getattr(pipe, "feature_extractor", None)
        if checker is None or processor is None:
            return None
        pipe.safety_checker = None
        return cls(checker, processor, source)

    @classmethod
    def load(cls, settings: Settings, model_id: str, device: str, dtype: Any) -> SafetyChecker:
        """Load a standalone checker from SD_SAFETY_CHECKER_ID (a repository or folder with
        safety_checker/ and feature_extractor/ subfolders)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker_id = tiny_models.checker_for(settings.safety_checker_id, model_id)
        source = model_source(checker_id, settings)
        kwargs = {key: value for key, value in source.kwargs.items() if key != "use_safetensors"}
        # Any: transformers types `.to()` of its models in a way mypy cannot follow through from_pretrained.
        checker: Any = StableDiffusionSafetyChecker.from_pretrained(
            source.location, subfolder="safety_checker", use_safetensors=True, dtype=dtype, **kwargs
        )
        processor = CLIPImageProcessor.from_pretrained(source.location, subfolder="feature_extractor", **kwargs)
        return cls(checker.to(device), processor, checker_id)

    def to(self, device: str) -> SafetyChecker:
        self.checker.to(device)
        return self

    def check(self, images: Any) -> list[bool]:
        """Flags for a batch of float images (N, H, W, 3) in [0, 1]."""
        import numpy as np
        import torch

        parameter = next(self.checker.parameters())
        pil_like = (np.clip(images, 0.0, 1.0) * 255).round().astype("uint8")
        clip_input = self.processor(list(pil_like), return_tensors="pt").pixel_values
        with torch.inference_mode():
            _, flags = self.checker(
                images=np.array(images, copy=True),
                clip_input=clip_input.to(device=parameter.device, dtype=parameter.dtype),
            )
        return [bool(flag) for flag in flags]
