"""Tiny LoRA files for the tiny models, made with PEFT the way trainers make them: adapter layers
injected into the model (`inject_adapter_in_model`), their `lora_B` randomized (PEFT starts it at
zero, which would be a LoRA without effect), saved by the pipeline's own `save_lora_weights` in the
diffusers LoRA format that `load_lora_weights` reads.

`lora_folder(model_dir)` builds one folder per session with every fixture the tests use, including
the hostile ones (a pickle named .safetensors, a .ckpt, symlinks in and out of the folder)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from imagegen.backends.local import tiny_models

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KLEIN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_qkv_mlp_proj"]


def _inject(module, targets: list[str]):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), module)
    return module


def _randomize(modules, seed: int, scale: float) -> None:  # type: ignore[no-untyped-def]
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _state(module):  # type: ignore[no-untyped-def]
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module)


def build_sd_lora(model: Path, target: Path, *, seed: int, text_encoder: bool = True, scale: float = 0.5) -> None:
    """A LoRA for an SD 1.x-style model: UNet attention, and optionally the CLIP text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    modules = [_inject(pipe.unet, UNET_TARGETS)]
    if text_encoder:
        modules.append(_inject(pipe.text_encoder, CLIP_TARGETS))
    _randomize(modules, seed, scale)
    StableDiffusionPipeline.save_lora_weights(
        target.parent,
        unet_lora_layers=_state(pipe.unet),
        text_encoder_lora_layers=_state(pipe.text_encoder) if text_encoder else None,
        weight_name=target.name,
    )


def build_sdxl_lora(model: Path, target: Path, *, seed: int) -> None:
    """A LoRA for an SDXL-style model: UNet and both text encoders."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    modules = [
        _inject(pipe.unet, UNET_TARGETS),
        _inject(pipe.text_encoder, CLIP_TARGETS),
        _inject(pipe.text_encoder_2, CLIP_TARGETS),
    ]
    _randomize(modules, seed, 0.5)
    StableDiffusionXLPipeline.save_lora_weights(
        target.parent,
        unet_lora_layers=_state(pipe.unet),
        text_encoder_lora_layers=_state(pipe.text_encoder),
        text_encoder_2_lora_layers=_state(pipe.text_encoder_2),
        weight_name=target.name,
    )


def build_klein_lora(model: Path, target: Path, *, seed: int, scale: float = 0.5) -> None:
    """A LoRA for a FLUX.2 [klein]-style transformer (double- and single-stream blocks)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model)
    _randomize([_inject(pipe.transformer, KLEIN_TARGETS)], seed, scale)
    Flux2KleinPipeline.save_lora_weights(
        target.parent, transformer_lora_layers=_state(pipe.transformer), weight_name=target.name
    )


def build_unmatched_sd_lora(target: Path) -> None:
    """SD-named LoRA tensors for layers no SD UNet has: diffusers loads nothing from it (and only
    logs a warning), which the service must notice."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8),
        "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 4),
    }
    save_file(tensors, str(target))


def build_mystery_lora(target: Path) -> None:
    """LoRA tensors under a prefix no pipeline reads: no family can be told from the names, and
    diffusers loads nothing from it (with a logged warning, no error)."""
    import torch
    from safetensors.torch import save_file

    save_file({"prior.blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8)}, str(target))


def lora_folder(model_dir: Path) -> Path:
    """One folder with every fixture LoRA (built once; later calls return it)."""
    folder = model_dir / "lora-fixtures"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_models.ensure_builtin(model_dir, tiny_models.TINY_SD)
    sdxl = tiny_models.ensure_builtin(model_dir, tiny_models.TINY_SDXL)
    klein = tiny_models.ensure_builtin(model_dir, tiny_models.TINY_FLUX2_KLEIN)
    build_sd_lora(sd, folder / "sd-style.safetensors", seed=1)
    build_sd_lora(sd, folder / "sd-unet-only.safetensors", seed=2, text_encoder=False)
    build_sdxl_lora(sdxl, folder / "sdxl-style.safetensors", seed=3)
    build_klein_lora(klein, folder / "klein-style.safetensors", seed=4)
    build_klein_lora(klein, folder / "klein-other.safetensors", seed=5)
    build_unmatched_sd_lora(folder / "sd-unmatched.safetensors")
    build_mystery_lora(folder / "mystery.safetensors")
    # Hostile or useless entries: a pickle under a .safetensors name, a .ckpt, symlinks.
    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (folder / "old-format.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    outside = model_dir / "outside-loras"
    outside.mkdir(exist_ok=True)
    build_sd_lora(sd, outside / "secret.safetensors", seed=6)
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")
    os.symlink("sd-style.safetensors", folder / "alias.safetensors")
    marker.write_text("ok")
    return folder
