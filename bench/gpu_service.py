"""Full-size denoisers on one CUDA GPU: images/s through the HTTP service vs the plain diffusers call.

    python bench/gpu_service.py               # CUDA; one JSON line per model family
    python bench/gpu_service.py --dry-run     # the same flow on CPU with the built-in tiny models

For each family (SD 1.5 at 512x512, SDXL at 1024x1024, FLUX.2 [klein] 4B at 1024x1024) the script
builds a pipeline with the real denoiser and VAE architecture and random weights (no network: the
text encoders keep the shapes the denoiser needs but are thin, and the tokenizers are the offline
byte-level ones; none of this changes the denoising cost), saves it with `save_pretrained`, then:

  plain     pipe(...) on the object in memory: batch 1 and batch 4 (one call with 4 prompts)
  service   the real app under uvicorn on loopback, loading the saved folder through
            `from_pretrained` like any model: POST /api/txt2img with num_images 1 and 4

and reports images/s of each, the ratio, and peak GPU memory. The safety checker is off (its weights
would come from the hub); PNG encoding and base64 of the service's answer are included, as a caller
pays for them. Random weights can decode to NaN/black pixels in half precision: the service then
answers 500 after the full denoising loop; such answers are counted in `service_errors` and their
time still measures the loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT / "src", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.gpu_flux import default_dtype  # noqa: E402 - after the path set-up above

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
FAMILIES = {
    # family: (size, steps, backend, built-in tiny model for --dry-run)
    "sd15": (512, 20, "sd", "tiny-sd"),
    "sdxl": (1024, 20, "sd", "tiny-sdxl"),
    "klein": (1024, 4, "flux-local", "tiny-flux2-klein"),
}


def _clip(tokenizer: Any, hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=4,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_full(family: str, target: Path, dtype: Any) -> Any:
    """A full-size pipeline of the family with random weights, built on the GPU and saved to target."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from imagegen.backends.local import tiny_models

    torch.manual_seed(0)
    if family == "klein":
        from bench.gpu_flux import build_pipeline

        pipe = build_pipeline(False, "cuda", dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(target, safe_serialization=True)
        return pipe
    # Schedulers and tokenizers are built outside the device context: a scheduler's tables must
    # stay on the CPU (it converts them with numpy).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    tokenizer = tiny_models._clip_tokenizer()
    tokenizer_2 = tiny_models._clip_tokenizer()
    with torch.device("cuda"), default_dtype(dtype):
        vae = AutoencoderKL(**SD_VAE, sample_size=512 if family == "sd15" else 1024)
        if family == "sd15":
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=_clip(tokenizer, 768),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD15_UNET),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=_clip(tokenizer, 768),
                text_encoder_2=_clip(tokenizer_2, 1280, 1280),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=scheduler,
                add_watermarker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(target, safe_serialization=True)
    return pipe


def load_tiny(family: str, model_dir: Path) -> tuple[Any, Path]:
    from diffusers import DiffusionPipeline

    from imagegen.backends.local import tiny_models

    path = tiny_models.ensure_builtin(model_dir, FAMILIES[family][3])
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe, path


def plain_call(pipe: Any, family: str, size: int, steps: int, batch: int, seed: int) -> float:
    import torch

    kwargs: dict[str, Any] = dict(
        prompt=[f"a lighthouse {i}" for i in range(batch)],
        width=size,
        height=size,
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
    )
    if family == "klein":
        kwargs["guidance_scale"] = 1.0
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(**kwargs)
    sync()
    return time.perf_counter() - started


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free(*objects: Any) -> None:
    import torch

    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_family(family: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx
    import torch

    from imagegen.config import Settings
    from imagegen.main import create_app
    from tests.support.server import LiveServer, wait_ready

    size, steps, backend_id, _ = FAMILIES[family]
    if args.dry_run:
        size, steps = 64, 2
    dtype = torch.bfloat16 if family == "klein" else torch.float16
    started = time.perf_counter()
    if args.dry_run:
        pipe, folder = load_tiny(family, work / "models")
    else:
        folder = work / family
        pipe = build_full(family, folder, dtype)
    build_seconds = time.perf_counter() - started
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    params = sum(p.numel() for p in denoiser.parameters())

    plain_call(pipe, family, size, steps, 1, 0)  # warm-up: kernel selection, allocator
    plain_1 = [plain_call(pipe, family, size, steps, 1, i) for i in range(args.runs)]
    plain_call(pipe, family, size, steps, 4, 0)
    plain_4 = [plain_call(pipe, family, size, steps, 4, i) for i in range(max(1, args.runs - 1))]
    plain_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    free(pipe)
    pipe = denoiser = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    settings = Settings(
        _env_file=None,
        host="127.0.0.1",
        model_dir=work / "models",
        output_dir=work / "outputs",
        data_dir=work / "data" / family,
        model_id=str(folder) if backend_id == "sd" else "tiny-sd",
        flux_model_id=str(folder),
        default_backend=backend_id,
        safety_checker=False,
        max_batch=4,
        max_width=2048,
        max_height=2048,
        device="cuda" if torch.cuda.is_available() else "cpu",
        job_timeout=600,
        log_level="warning",
        max_loaded_pipelines=1,
    )
    app = create_app(settings)
    errors: list[str] = []
    service_1: list[float] = []
    service_4: list[float] = []
    load_started = time.perf_counter()
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        wait_ready(client, timeout=600)
        load_seconds = time.perf_counter() - load_started

        def post(batch: int, seed: int) -> float:
            body = {
                "prompt": "a lighthouse",
                "backend": backend_id,
                "width": size,
                "height": size,
                "steps": steps,
                "num_images": batch,
                "seed": seed,
            }
            began = time.perf_counter()
            response = client.post("/api/txt2img", json=body)
            elapsed = time.perf_counter() - began
            if response.status_code != 200:
                message = f"{response.status_code} {response.json()['error']['type']}"
                if message not in errors:
                    errors.append(message)
            return elapsed

        post(1, 0)
        service_1 = [post(1, i) for i in range(args.runs)]
        post(4, 0)
        service_4 = [post(4, i) for i in range(max(1, args.runs - 1))]
        service_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    free(app)

    def per_second(times: list[float], images: int) -> float:
        return images / statistics.median(times)

    gib = 2**30
    result = {
        "bench": "gpu_service",
        "family": family,
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "steps": steps,
        "denoiser_params_billions": round(params / 1e9, 3),
        "plain_images_per_s_batch1": round(per_second(plain_1, 1), 3),
        "service_images_per_s_batch1": round(per_second(service_1, 1), 3),
        "plain_images_per_s_batch4": round(per_second(plain_4, 4), 3),
        "service_images_per_s_batch4": round(per_second(service_4, 4), 3),
        "plain_peak_gib": round(plain_peak / gib, 2) if plain_peak else None,
        "service_peak_gib": round(service_peak / gib, 2) if service_peak else None,
        "service_load_seconds": round(load_seconds, 1),
        "build_seconds": round(build_seconds, 1),
        "service_errors": errors,
        "runs": args.runs,
    }
    result["service_vs_plain_batch1"] = round(
        result["service_images_per_s_batch1"] / result["plain_images_per_s_batch1"], 3
    )
    result["batch4_vs_batch1_service"] = round(
        result["service_images_per_s_batch4"] / result["service_images_per_s_batch1"], 3
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny built-in models on CPU (checks the script)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--runs", type=int, default=3, help="timed batch-1 runs per path (batch 4: one fewer)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_service.py needs a CUDA GPU (use --dry-run to check the script on CPU)")
    work = Path(tempfile.mkdtemp(prefix="imagegen-gpu-"))
    try:
        for family in args.families:
            try:
                line = json.dumps(measure_family(family, args, work))
            except Exception as error:  # noqa: BLE001 - one family failing must not hide the others
                line = json.dumps(
                    {"bench": "gpu_service", "family": family, "error": f"{type(error).__name__}: {error}"}
                )
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as handle:
                    handle.write(line + "\n")
            shutil.rmtree(work / family, ignore_errors=True)  # disk: a family's weights are GBs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
