"""flux-local on this machine's CPU: load time and first image of the built-in tiny FLUX pipelines,
and process RSS with a pipeline loaded vs after unloading it.

Run alone with `python -m bench flux_local`. Generation goes through FluxLocalBackend.generate (the
worker thread, lock, checks and PIL conversion the HTTP route uses), without HTTP. The tiny models
are built once into a temporary folder first (not timed). RSS is measured on a tiny FLUX.1 model
carrying 128 MiB of T5 ballast stored in bfloat16, like real checkpoints, so that loading it in
float32 costs process memory that unloading must give back.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

BALLAST_ROWS = 1_000_000  # x 32 float32 = 128 MB


def _generate(backend: Any, seed: int) -> float:
    from imagegen.backends.base import RunContext
    from imagegen.generation import GenerationParams

    request = backend.resolve(GenerationParams(prompt="a red fox in the snow", seed=seed))
    started = time.perf_counter()
    asyncio.run(backend.generate([request], RunContext(["bench"], deadline=time.monotonic() + 300)))
    return time.perf_counter() - started


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def run() -> list[dict[str, Any]]:
    started = time.perf_counter()
    import diffusers  # noqa: F401 - the import cost a first load pays once per process
    import torch  # noqa: F401

    import_seconds = time.perf_counter() - started
    from imagegen.backends.local import tiny_models
    from imagegen.backends.local.flux_local import FluxLocalBackend
    from imagegen.config import Settings

    rows: list[dict[str, Any]] = [
        {
            "metric": "import torch+diffusers",
            "value": import_seconds,
            "unit": "s",
            "target": None,
            "met": None,
            "detail": "paid once by the first local load of a process (0 if another module imported them first)",
        }
    ]
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        for model_id in (tiny_models.TINY_FLUX2_KLEIN, tiny_models.TINY_FLUX):
            tiny_models.ensure_builtin(model_dir, model_id)
            tiny_models.ensure_builtin(model_dir, tiny_models.TINY_SAFETY_CHECKER)
            backend = FluxLocalBackend(Settings(_env_file=None, flux_model_id=model_id, model_dir=model_dir))
            before = _rss()
            load_started = time.perf_counter()
            backend.ensure_loaded()
            load = time.perf_counter() - load_started
            first = _generate(backend, 1)
            warm = min(_generate(backend, seed) for seed in (2, 3, 4))
            loaded = _rss()
            backend.unload()
            after = _rss()
            steps = backend.capabilities().default_steps
            size = backend.capabilities().default_width
            rows += [
                {
                    "metric": f"{model_id} load",
                    "value": load,
                    "unit": "s",
                    "target": None,
                    "met": None,
                    "detail": "from_pretrained of the folder + placing + tiny safety checker (warm disk cache)",
                },
                {
                    "metric": f"{model_id} first image",
                    "value": first,
                    "unit": "s",
                    "target": None,
                    "met": None,
                    "detail": f"{size}x{size}, {steps} steps, right after loading",
                },
                {
                    "metric": f"{model_id} warm image",
                    "value": warm,
                    "unit": "s",
                    "target": None,
                    "met": None,
                    "detail": "best of 3 further calls",
                },
                {
                    "metric": f"{model_id} RSS loaded / unloaded",
                    "value": (loaded - after) / mib,
                    "unit": "MiB",
                    "target": None,
                    "met": None,
                    "detail": f"before load {before / mib:.0f}, loaded {loaded / mib:.0f}, unloaded {after / mib:.0f} MiB",
                },
            ]

        folder = model_dir / "flux-ballast"
        tiny_models.build(
            lambda target: tiny_models.build_tiny_flux(target, t5_vocab_rows=BALLAST_ROWS, save_dtype="bfloat16"),
            folder,
        )
        backend = FluxLocalBackend(
            Settings(_env_file=None, flux_model_id=str(folder), model_dir=model_dir, safety_checker=False)
        )
        before = _rss()
        backend.ensure_loaded()
        _generate(backend, 1)
        loaded = _rss()
        backend.unload()
        after = _rss()
        grown, released = loaded - before, loaded - after
        rows.append(
            {
                "metric": "ballast model: RSS given back on unload",
                "value": released / mib,
                "unit": "MiB",
                "target": ">= 90% of what loading took",
                "met": released >= 0.9 * grown,
                "detail": f"before {before / mib:.0f}, loaded {loaded / mib:.0f} (+{grown / mib:.0f}), "
                f"unloaded {after / mib:.0f} MiB; 128 MiB of float32 ballast",
            }
        )
    return rows
