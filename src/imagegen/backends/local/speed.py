"""The opt-in speed modes of the local backends (docs/operations.md, "Speed modes on CUDA").

`SD_COMPILE=off|regional|full`: torch.compile of the denoiser and of the VAE decoder.
  regional   diffusers' `compile_repeated_blocks`: each repeated transformer block class (FLUX's
             double and single blocks, the UNet's BasicTransformerBlock) is compiled once and reused
             by every block of that class: compiles in a fraction of the time, most of the speed.
  full       the whole denoiser; a UNet (SD, SDXL) on CUDA with inductor's CUDA graphs
             ("reduce-overhead": SD 1.5 at 512² is bound by kernel launches, where graphs pay); a
             FLUX transformer without (its 1024² steps are long matrix products: graphs gain little
             and cost memory per shape).
  Convolutional parts (UNet, VAE) go channels_last first. Every shape is specialised
  (`dynamic=False`): the sizes of `SD_COMPILE_SIZES` (default: the model's native size), each with
  batch sizes 1 to SD_MAX_BATCH, are compiled by a warm-up right after the load, on the device thread
  (CUDA graphs belong to the thread that recorded them), while /health says `warming`. After the
  warm-up the process runs under `torch.compiler.set_stance("eager_on_recompile")`: a shape that was
  not warmed runs the eager modules at once instead of stalling the device on a compile (the guards
  of the compiled code still pick the compiled version for warmed shapes). A warm-up that fails
  (a compiler error) puts the modules back to eager and says so in /health; the backend still serves.

  The compiler's caches (inductor's FX graph and AOTAutograd caches, Triton's kernels) are kept under
  SD_MODEL_DIR/compile-cache/torch-<version> through TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR
  (unless the operator set those): a restart traces again (seconds) but compiles no kernel again.

`SD_QUANTIZE=fp8`: torchao's fp8 dynamic quantization (`Float8DynamicActivationFloat8WeightConfig`,
  one scale per row) of the denoiser's linear layers, before compiling. It needs fp8 tensor cores:
  an NVIDIA GPU of compute capability 8.9 or newer. Anywhere else the load is refused before any
  weight is read, with a message naming the setting (`check`); SD_DEVICE=cpu/mps is refused by the
  settings themselves (config.py).

Only `check`, `apply` and `warm_up` touch torch; they run in the load path of LocalPipelineBackend
(backends/local/base.py), so in the device process too when there is one. (They take the backend and
its LoadedPipeline as `Any`: base.py imports this module, and the layer rules allow no cycle.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from imagegen.config import Settings
from imagegen.errors import BackendUnavailableError

log = logging.getLogger("imagegen.backends")

#: fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
#: The stance of a process whose compiled modules are warm: unknown shapes run eagerly.
WARM_STANCE = "eager_on_recompile"
#: The name prefix of the device thread (backends/local/base.py `device_executor`).
DEVICE_THREAD_PREFIX = "imagegen-device"


def requested(settings: Settings) -> bool:
    """Whether any speed mode is on (cheap: no torch)."""
    return settings.compile != "off" or settings.quantize != "off"


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def on_device_thread() -> bool:
    return threading.current_thread().name.startswith(DEVICE_THREAD_PREFIX)


@dataclass
class SpeedModes:
    """What the settings ask for one load, and what became of it (shown in /health and /info)."""

    compile: str
    quantize: str
    compile_backend: str
    sizes: list[tuple[int, int]]
    max_batch: int
    status: dict[str, Any] = field(default_factory=dict)
    #: The modules compiled by `apply`, to put back to eager if the warm-up fails.
    compiled: list[Any] = field(default_factory=list)

    @classmethod
    def of(cls, settings: Settings) -> SpeedModes:
        return cls(
            compile=settings.compile,
            quantize=settings.quantize,
            compile_backend=settings.compile_backend,
            sizes=[parse_size(size) for size in settings.compile_sizes],
            max_batch=settings.max_batch,
        )

    @property
    def needs_warm_up(self) -> bool:
        return bool(self.compiled)

    # -- before the load: refuse what cannot work -----------------------------------------------
    def check(self, settings: Settings) -> None:
        """Refuse SD_QUANTIZE=fp8 where it cannot run, before a weight is read (the load fails with a
        message naming the setting; /health and the start-up log show it)."""
        self.status = {"compile": self.compile, "quantize": self.quantize}
        if self.compile != "off":
            sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes) or "the model's native size"
            log.info(
                "speed mode: SD_COMPILE=%s (backend %s; warm-up of %s, batch sizes 1-%d, before ready)",
                self.compile,
                self.compile_backend,
                sizes,
                self.max_batch,
            )
        if self.quantize != "off":
            log.info("speed mode: SD_QUANTIZE=%s (torchao, the denoiser's linear layers)", self.quantize)
        if self.quantize != "fp8":
            return
        from imagegen.backends.local.support import pick_device

        device = pick_device(settings.device)
        problem = fp8_problem(device)
        if problem is not None:
            self.status["quantize"] = "refused"
            self.status["quantize_refused"] = problem
            raise BackendUnavailableError(problem)

    # -- after the load: quantize, lay out, wrap for compiling (nothing is compiled yet) ---------
    def apply(self, loaded: Any, model_dir: os.PathLike[str] | str) -> None:
        import torch

        pipe = loaded.pipe
        unet = getattr(pipe, "unet", None)
        denoiser = unet if unet is not None else pipe.transformer
        if self.quantize == "fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            started = time.monotonic()
            quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            self.status["quantize"] = "fp8"
            self.status["quantize_detail"] = "torchao fp8 dynamic activations and weights, per row, linear layers"
            log.info("speed mode: SD_QUANTIZE=fp8 applied in %.1f s", time.monotonic() - started)
        if self.compile == "off":
            return
        self.status["compile_cache"] = str(use_compile_cache(model_dir, torch.__version__))
        options: dict[str, Any] = {"backend": self.compile_backend, "dynamic": False, "fullgraph": True}
        if unet is not None:
            unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if self.compile == "regional":
            denoiser.compile_repeated_blocks(**options)
            self.compiled.extend(
                module for module in denoiser.modules() if type(module).__name__ in denoiser._repeated_blocks
            )
            scope = f"{type(denoiser).__name__} repeated blocks ({', '.join(denoiser._repeated_blocks)})"
        else:
            cuda_graphs = unet is not None and loaded.device == "cuda" and self.compile_backend == "inductor"
            denoiser.compile(**options, **({"mode": "reduce-overhead"} if cuda_graphs else {}))
            self.compiled.append(denoiser)
            scope = f"whole {type(denoiser).__name__}" + (" with CUDA graphs" if cuda_graphs else "")
        pipe.vae.decoder.compile(**{**options, "fullgraph": False})
        self.compiled.append(pipe.vae.decoder)
        self.status.update(compile_scope=f"{scope} and the VAE decoder", compile_backend=self.compile_backend)
        # Each warmed shape is one more compiled entry per code object: keep dynamo from giving up.
        shapes = max(1, len(self.sizes)) * self.max_batch
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * shapes + 8)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 8 * shapes + 256
        )

    # -- the warm-up (on the device thread) -------------------------------------------------------
    def warm_up(self, backend: Any, loaded: Any) -> None:
        """One pipeline call per size and batch size under the default stance (each compiles its
        shapes), then the warm stance. A failure puts the modules back to eager."""
        import torch

        from imagegen.backends.base import RunContext
        from imagegen.backends.conditioning import Conditioning
        from imagegen.errors import ServiceError
        from imagegen.generation import GenerationParams, GenerationRequest

        capabilities = backend.capabilities_for(backend.model_id)
        sizes = self.sizes or [(capabilities.default_width, capabilities.default_height)]
        batches = range(1, min(self.max_batch, capabilities.max_batch) + 1)
        shapes: list[tuple[str, list[GenerationRequest]]] = []
        for width, height in sizes:
            params = GenerationParams(prompt="warm-up", width=width, height=height, steps=2, model=backend.model_id)
            try:
                first = backend.resolve(params)
            except ServiceError as error:  # a size this model refuses: say so, warm the others
                self.status.setdefault("skipped", []).append(f"{width}x{height}: {error.message}")
                log.warning("speed mode: SD_COMPILE_SIZES %dx%d skipped: %s", width, height, error.message)
                continue
            for size in batches:
                # One request per image: how the engine merges queued jobs into one call.
                requests = [first.model_copy(update={"seeds": (seed,)}) for seed in range(size)]
                shapes.append((f"{width}x{height}x{size}", requests))
        started = time.monotonic()
        graphs_before = compiled_graphs()
        warmed: list[str] = []
        try:
            with torch.compiler.set_stance("default"):
                for name, requests in shapes:
                    ctx = RunContext([f"warm-up-{index}" for index in range(len(requests))], time.monotonic() + 3600)
                    backend.run_pipeline(loaded, requests, ctx, Conditioning())
                    warmed.append(name)
        except Exception as error:  # noqa: BLE001 - a compiler failure must not take the backend down
            self.undo()
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
            self.status.update(compile="failed", compile_error=reason[:300], warmed=warmed)
            log.error("speed mode: SD_COMPILE=%s warm-up failed (%s); running eagerly", self.compile, reason)
            return
        torch.compiler.set_stance(WARM_STANCE)
        seconds = time.monotonic() - started
        self.status.update(
            warmed=warmed,
            warm_up_seconds=round(seconds, 1),
            compiled_graphs=compiled_graphs() - graphs_before,
            other_sizes="run eagerly (torch.compiler.set_stance eager_on_recompile)",
        )
        log.info(
            "speed mode: SD_COMPILE=%s warm for %s (WIDTHxHEIGHTxBATCH) in %.1f s; other shapes run eagerly",
            self.compile,
            ", ".join(warmed) or "no size",
            seconds,
        )

    def undo(self) -> None:
        """Put every compiled module back to its eager forward."""
        for module in self.compiled:
            module._compiled_call_impl = None
        self.compiled.clear()


def fp8_problem(device: str) -> str | None:
    """Why fp8 quantization cannot run on `device`, or None."""
    fix = "set SD_QUANTIZE=off"
    if device != "cuda":
        return f"SD_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer; the device is {device}: {fix}"
    import torch

    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        return (
            f"SD_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
            f"{name} is {capability[0]}.{capability[1]}: {fix}"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        return f"SD_QUANTIZE=fp8 needs torchao (the 'local' extra: `make install`): {fix}"
    return None


def use_compile_cache(model_dir: os.PathLike[str] | str, torch_version: str) -> str:
    """Point inductor's and Triton's on-disk caches under SD_MODEL_DIR (a persistent volume in Docker),
    unless the operator chose other folders; the folder in use."""
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = Path(model_dir).resolve() / "compile-cache" / f"torch-{torch_version.replace('+', '-')}"
    # Inductor writes its default (a folder under /tmp) into the environment the first time it looks:
    # that value is not the operator's choice.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (each warmed shape of each region adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
