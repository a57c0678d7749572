"""FLUX.2 [klein] 4B-sized denoising on one CUDA GPU: our service path vs plain diffusers.

    python bench/gpu_flux.py                # CUDA, bf16, 1024x1024; prints one JSON line
    python bench/gpu_flux.py --dry-run      # tiny sizes on CPU: checks the script itself

No network is needed: the transformer is a Flux2Transformer2DModel with klein 4B's published
architecture and random weights. The text encoder keeps the dimensions the transformer needs
(hidden 2560 = joint_attention_dim / 3, 28 layers because klein stacks layers 9/18/27) but is made
thin (4 heads, MLP 1024, byte-level vocabulary): it runs once per image and does not enter the
step rate. The VAE is AutoencoderKLFlux2 with its default (real) architecture.

Both paths run the same pipeline object on the same inputs:
  plain    pipe(prompt=..., 1024x1024, N steps), as diffusers' model card shows it
  service  FluxLocalBackend.generate(): fresh scheduler per call, CPU generators, step callback
           (progress, cancellation, deadline), NaN/black checks, conversion to PIL images
Step rate = (N_high - N_low) / (t_high - t_low): text encoding, VAE decoding and the per-image
checks cancel out, leaving the denoising loop. The safety checker is off (it needs hub weights);
it runs once per image, outside the loop.

Assumed klein 4B transformer config (the values published in the model's transformer/config.json,
as quoted by several independent loaders; diffusers ships no klein config of its own):
patch_size 1, in_channels 128, num_layers 5, num_single_layers 20, attention_head_dim 128,
num_attention_heads 24, joint_attention_dim 7680, timestep_guidance_channels 256, mlp_ratio 3.0,
axes_dims_rope (32, 32, 32, 32), rope_theta 2000, eps 1e-6, guidance_embeds False.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}

# --dry-run: the same code on CPU with tiny shapes (tiny VAE: 1 latent channel -> in_channels 4).
TINY_TRANSFORMER: dict[str, Any] = {
    **KLEIN_4B_TRANSFORMER,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "axes_dims_rope": (4, 4, 4, 4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script, no GPU)")
    parser.add_argument("--size", type=int, default=None, help="image width and height (default 1024; 64 dry-run)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="step counts whose time difference gives the step rate (default 4 12; 1 3 dry-run)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per step count; the fastest counts")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.dry_run else 1024)
    args.steps = args.steps or ([1, 3] if args.dry_run else [4, 12])
    if args.size % 16 or args.size < 16:
        parser.error("--size must be a positive multiple of 16")
    if not 1 <= args.steps[0] < args.steps[1]:
        parser.error("--steps needs 1 <= LOW < HIGH")
    return args


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Create weights directly in the target dtype (halves peak memory while building 4B params)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(dry_run: bool, device: str, dtype: Any) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from imagegen.backends.local.tiny_models import _qwen_tokenizer

    config = TINY_TRANSFORMER if dry_run else KLEIN_4B_TRANSFORMER
    torch.manual_seed(0)
    tokenizer = _qwen_tokenizer()
    hidden = config["joint_attention_dim"] // 3  # klein stacks three hidden states of the encoder
    encoder_config = Qwen3Config(
        hidden_size=hidden,
        num_hidden_layers=28,
        num_attention_heads=2 if dry_run else 4,
        num_key_value_heads=2 if dry_run else 4,
        head_dim=8 if dry_run else 128,
        intermediate_size=16 if dry_run else 1024,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    vae_config: dict[str, Any] = {}
    if dry_run:
        vae_config = dict(
            sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(4, 8),
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    with torch.device(device), default_dtype(dtype):
        transformer = Flux2Transformer2DModel(**config)
        text_encoder = Qwen3ForCausalLM(encoder_config)
        vae = AutoencoderKLFlux2(**vae_config)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_plain(pipe: Any, size: int, steps: int, device: str) -> float:
    """diffusers as its docs show it (plus a CPU generator, as the service uses)."""
    import torch

    _synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt="a red fox in the snow",
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        )
    _synchronize(device)
    return time.perf_counter() - started


def time_service(backend: Any, size: int, steps: int, device: str) -> tuple[float, str | None]:
    """One request through FluxLocalBackend.generate (worker thread, lock, checks, PIL)."""
    from imagegen.backends.base import RunContext
    from imagegen.errors import ServiceError
    from imagegen.generation import GenerationParams

    request = backend.resolve(
        GenerationParams(prompt="a red fox in the snow", width=size, height=size, steps=steps, seed=0)
    )
    ctx = RunContext(["bench"], deadline=time.monotonic() + 600)
    error = None
    _synchronize(device)
    started = time.perf_counter()
    try:
        asyncio.run(backend.generate([request], ctx))
    except ServiceError as exc:
        # Random weights may decode to NaN/black pixels; the loop still ran every step.
        error = f"{exc.error_type}: {exc.message}"
    _synchronize(device)
    return time.perf_counter() - started, error


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import diffusers
    import torch

    from imagegen.backends.local.base import LoadState
    from imagegen.backends.local.flux_local import FluxLocalBackend
    from imagegen.config import Settings

    if args.dry_run:
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_flux.py needs a CUDA GPU (use --dry-run to check the script on CPU)")
        device = "cuda"
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = True

    build_started = time.perf_counter()
    pipe = build_pipeline(args.dry_run, device, dtype)
    _synchronize(device)
    build_seconds = time.perf_counter() - build_started
    weights_bytes = int(torch.cuda.memory_allocated()) if device == "cuda" else None
    low, high = args.steps

    settings = Settings(
        _env_file=None,
        flux_model_id="bench-klein-4b-random",
        safety_checker=False,
        max_width=max(2048, args.size),
        max_height=max(2048, args.size),
        max_pixels=max(2048 * 2048, args.size * args.size),
    )
    backend = FluxLocalBackend(settings)
    loaded = backend.prepare(pipe, device, dtype)
    # Adopt the pipeline built in memory: there is nothing on disk to load.
    backend._loaded, backend._state = loaded, LoadState.READY
    errors: list[str] = []

    def plain(steps: int) -> float:
        pipe.vae.disable_tiling()  # plain diffusers defaults (prepare() turned tiling on)
        return time_plain(pipe, args.size, steps, device)

    def service(steps: int) -> float:
        if settings.flux_vae_tiling:
            pipe.vae.enable_tiling()  # a no-op at or below the VAE's tile size (1024 px)
        seconds, error = time_service(backend, args.size, steps, device)
        if error and error not in errors:
            errors.append(error)
        return seconds

    # Warm-up (kernel selection, allocator), then the two paths interleaved, so that drift of the
    # machine (clocks, other load) hits both alike; the fastest run of each counts.
    peaks: dict[str, int | None] = {}
    for name, timer in (("plain", plain), ("service", service)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer(1)
        timer(high)
        peaks[name] = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for steps in (low, high):
            for name, timer in (("plain", plain), ("service", service)):
                seconds = timer(steps)
                best[(name, steps)] = min(seconds, best.get((name, steps), seconds))

    def rate(name: str) -> float | None:
        delta = best[(name, high)] - best[(name, low)]
        # Tiny dry-run shapes: steps cost less than the timing noise, so there may be no rate.
        return (high - low) / delta if delta > 0 else None

    plain_rate, service_rate = rate("plain"), rate("service")
    plain_peak, service_peak = peaks["plain"], peaks["service"]
    plain_times = {str(n): round(best[("plain", n)], 4) for n in (low, high)}
    service_times = {str(n): round(best[("service", n)], 4) for n in (low, high)}

    gib = 2**30
    return {
        "bench": "gpu_flux",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "size": args.size,
        "steps": [low, high],
        "transformer_params_billions": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 3),
        "plain_it_per_s": round(plain_rate, 3) if plain_rate else None,
        "service_it_per_s": round(service_rate, 3) if service_rate else None,
        "service_vs_plain": round(service_rate / plain_rate, 3) if plain_rate and service_rate else None,
        "plain_seconds": plain_times,
        "service_seconds": service_times,
        "weights_gib": round(weights_bytes / gib, 2) if weights_bytes is not None else None,
        "plain_peak_gib": round(plain_peak / gib, 2) if plain_peak is not None else None,
        "service_peak_gib": round(service_peak / gib, 2) if service_peak is not None else None,
        "service_errors": errors,
        "build_seconds": round(build_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
