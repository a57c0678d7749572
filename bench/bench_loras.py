"""LoRA adapters on this machine's CPU, tiny models (tiny-sd 64x64 and tiny-flux2-klein 64x64, 4
steps), through the backend's generate() (the worker thread, lock, adapter switching and checks the
HTTP route uses), without HTTP:

- the first request with a new LoRA (the adapter is loaded, checked and activated) / the same
  request without a LoRA; median over 6 different LoRA files;
- switching between two loaded LoRAs on every request / no LoRA, and the same LoRA on every
  request / no LoRA (the cost of running unfused adapters);
- memory per loaded adapter: its weights (bytes of its lora_A/lora_B) and process RSS growth;
- why adapters are not fused: the weight error one fuse + unfuse leaves in the UNet.

Run alone with `python -m bench loras`. Tiny LoRAs are built with PEFT first (not timed).
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

COPIES = 6
ROUNDS = 8


def _rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def _timed(backend: Any, loras: list[dict[str, Any]], seed: int = 1) -> float:
    from imagegen.backends.base import RunContext
    from imagegen.generation import GenerationParams

    params = GenerationParams(prompt="a red fox in the snow", seed=seed, width=64, height=64, steps=4, loras=loras)
    request = backend.resolve(params)
    started = time.perf_counter()
    asyncio.run(backend.generate([request], RunContext(["bench"], deadline=time.monotonic() + 300)))
    return time.perf_counter() - started


def _family(backend: Any, folder: Path, label: str) -> list[dict[str, Any]]:
    """Interleaved, so that a busy machine slows both sides of each ratio alike."""
    backend.ensure_loaded()
    for _ in range(2):
        _timed(backend, [])  # warm up
    before = _rss()
    first: list[float] = []
    for index in range(COPIES):
        plain = _timed(backend, [])
        first.append(_timed(backend, [{"name": f"copy-{index}"}]) / plain)
    grown = (_rss() - before) / COPIES
    adapters = backend._loaded.adapters.describe()["loaded"]
    weights = statistics.median(item["bytes"] for item in adapters)
    layers = adapters[0]["layers"]
    plain_times, switch_times, same_times = [], [], []
    for _ in range(ROUNDS):
        plain_times.append(_timed(backend, []))
        _timed(backend, [{"name": "copy-0"}])
        switch_times.append(_timed(backend, [{"name": "copy-1"}]))  # another loaded LoRA
        same_times.append(_timed(backend, [{"name": "copy-1"}]))  # the same again
    plain = statistics.median(plain_times)
    loads = backend._loaded.adapters.describe()["loads"]
    size = backend.capabilities().default_width
    detail = f"{size}x{size}, 4 steps; no LoRA {plain * 1000:.1f} ms (median of {ROUNDS})"
    return [
        {
            "metric": f"{label} first request with a new LoRA / without",
            "value": statistics.median(first),
            "unit": "x",
            "target": None,
            "met": None,
            "detail": f"{detail}; median of {COPIES} LoRA files ({layers} layers each), each after a request "
            "without: load + check + activate + generate",
        },
        {
            "metric": f"{label} switching between 2 loaded LoRAs / without",
            "value": statistics.median(switch_times) / plain,
            "unit": "x",
            "target": "no reload",
            "met": loads == COPIES,
            "detail": f"{statistics.median(switch_times) * 1000:.1f} ms a request after one with the other LoRA; "
            f"loads stayed {loads} (nothing reloaded)",
        },
        {
            "metric": f"{label} same LoRA again / without",
            "value": statistics.median(same_times) / plain,
            "unit": "x",
            "target": None,
            "met": None,
            "detail": f"{statistics.median(same_times) * 1000:.1f} ms: the unfused adapter's extra matmuls alone",
        },
        {
            "metric": f"{label} memory per loaded adapter",
            "value": weights / 1024,
            "unit": "KiB",
            "target": None,
            "met": None,
            "detail": f"its lora_A/lora_B weights; process RSS grew {grown / 1024:.0f} KiB per adapter "
            "(PEFT layer objects and allocator slack on top)",
        },
    ]


def _fuse_drift(model: Path, lora: Path) -> dict[str, Any]:
    """The largest weight change one fuse_lora + unfuse_lora leaves behind (exact would be 0)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    before = {name: value.detach().clone() for name, value in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    drift = max((before[name] - after[name]).abs().max().item() for name in before if name in after)
    changed = sum(1 for name in before if name in after and not torch.equal(before[name], after[name]))
    return {
        "metric": "tiny-sd weight error after one fuse + unfuse",
        "value": drift * 1e9,
        "unit": "x 1e-9",
        "target": None,
        "met": None,
        "detail": f"{changed} UNet tensors not restored bit for bit: why the service never fuses (docs/loras.md)",
    }


def run() -> list[dict[str, Any]]:
    from imagegen.backends.local import tiny_models
    from imagegen.backends.local.flux_local import FluxLocalBackend
    from imagegen.backends.local.sd import StableDiffusionBackend
    from imagegen.config import Settings
    from tests.support.loras import build_klein_lora, build_sd_lora

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        tiny_models.ensure_builtin(model_dir, tiny_models.TINY_SAFETY_CHECKER)
        for model_id, builder, backend_class in (
            (tiny_models.TINY_SD, build_sd_lora, StableDiffusionBackend),
            (tiny_models.TINY_FLUX2_KLEIN, build_klein_lora, FluxLocalBackend),
        ):
            folder = model_dir / f"loras-{model_id}"
            folder.mkdir()
            model = tiny_models.ensure_builtin(model_dir, model_id)
            for index in range(COPIES):
                builder(model, folder / f"copy-{index}.safetensors", seed=index)
            settings = Settings(
                _env_file=None,
                model_id=tiny_models.TINY_SD,
                flux_model_id=tiny_models.TINY_FLUX2_KLEIN,
                model_dir=model_dir,
                lora_dir=folder,
                max_loaded_loras=COPIES,
            )
            backend = backend_class(settings)
            rows += _family(backend, folder, model_id)
            backend.unload()
            if model_id == tiny_models.TINY_SD:
                rows.append(_fuse_drift(model, folder / "copy-0.safetensors"))
            shutil.rmtree(folder)
    return rows
