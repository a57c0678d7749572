"""Image-conditioned generation (docs/editing.md), each figure measured side by side:

- img2img overhead: synchronous POST /api/img2img end to end (base64 upload, safe decoding, the input
  store, the job, the from_pipe pipeline, PNG encode and base64 answer) vs the diffusers img2img pipeline
  called directly in this process on the same image and parameters (interleaved runs, medians);
- decoding untrusted uploads: a 4096x4096 PNG (time, peak memory) and a 40 MP decompression bomb of a
  few hundred bytes, which must be refused from its header before any decoding (< 50 MiB extra).
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.process import SERVE, ServiceProcess

RUNS = 12
SIZE = 128
STEPS = 20
STRENGTH = 0.75
MIB = 2**20


def _init_image() -> Any:
    from PIL import Image

    return Image.effect_noise((SIZE, SIZE), 60).convert("RGB")


def _direct_pipeline(model_dir: Path, image: Any):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import AutoPipelineForImage2Image

    from imagegen.backends.local.tiny_models import ensure_builtin

    path = ensure_builtin(model_dir, "tiny-sd")
    pipe = AutoPipelineForImage2Image.from_pretrained(path, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int) -> None:
        with torch.inference_mode():
            pipe(
                prompt="the same, in winter",
                image=image,
                strength=STRENGTH,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed),
            )

    return call


def _overhead() -> dict[str, Any]:
    model_dir = Path(tempfile.mkdtemp(prefix="imagegen-bench-models-"))
    image = _init_image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    upload = base64.b64encode(buffer.getvalue()).decode("ascii")
    direct = _direct_pipeline(model_dir, image)
    body = {"prompt": "the same, in winter", "images": [upload], "strength": STRENGTH, "steps": STEPS}
    with (
        ServiceProcess(command=SERVE, ready_timeout=600, SD_MODEL_DIR=str(model_dir), SD_MODEL_ID="tiny-sd") as service,
        httpx.Client(base_url=service.url, timeout=120) as client,
    ):
        direct(0)
        assert client.post("/api/img2img", json={**body, "seed": 0}).status_code == 200
        direct_times, service_times = [], []
        for index in range(RUNS):
            started = time.perf_counter()
            direct(index)
            direct_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            response = client.post("/api/img2img", json={**body, "seed": index})
            service_times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    ratio = statistics.median(service_times) / statistics.median(direct_times)
    return {
        "metric": "img2img overhead (POST /api/img2img / direct img2img call)",
        "value": ratio,
        "unit": "x",
        "target": "<= 1.05",
        "met": ratio <= 1.05,
        "detail": f"tiny-sd {SIZE}x{SIZE}, {STEPS} steps x strength {STRENGTH} = {int(STEPS * STRENGTH)} run, "
        f"median of {RUNS}: service {statistics.median(service_times) * 1000:.1f} ms, direct "
        f"{statistics.median(direct_times) * 1000:.1f} ms (direct = the diffusers img2img pipeline with its "
        "safety checker on the same PIL image; service adds HTTP, base64 and safe decoding of the upload, "
        "the input store, the job, the checker, PNG encode + save, base64 answer)",
    }


_PROBE = """
import gc, json, sys, threading, time
from pathlib import Path
import psutil
from imagegen.errors import InvalidParameterError
from imagegen.storage.image_decoding import decode_image
data = Path(sys.argv[1]).read_bytes()
limit = int(sys.argv[2])
process = psutil.Process()
gc.collect()
before = process.memory_info().rss
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
started = time.perf_counter()
try:
    decoded = decode_image(data, param="images[0]", max_pixels=limit)
    outcome = f"decoded {decoded.width}x{decoded.height}"
except InvalidParameterError as error:
    outcome = f"refused: {error.message}"
seconds = time.perf_counter() - started
peak[0] = max(peak[0], process.memory_info().rss)
done.set()
sampler.join()
print(json.dumps({"seconds": seconds, "extra_kib": (peak[0] - before) / 1024, "outcome": outcome}))
"""


def _measure(data: bytes, max_pixels: int) -> tuple[float, float, str]:
    """(seconds, extra peak RSS in MiB, outcome) of decoding `data` as an upload, in a fresh process whose
    RSS is sampled every 0.5 ms while it decodes (Pillow allocates outside tracemalloc's view)."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(data)
        handle.flush()
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, handle.name, str(max_pixels)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return float(found["seconds"]), found["extra_kib"] / 1024, str(found["outcome"])


def _decoding() -> list[dict[str, Any]]:
    from PIL import Image

    from imagegen.config import Settings
    from tests.support.editing import png_bomb

    limit = Settings(_env_file=None).max_input_pixels
    # A photo-like 4096x4096 PNG (noise compresses badly: the worst case for decoding time).
    noise = Image.effect_noise((1024, 1024), 60).convert("RGB").resize((4096, 4096))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=1)
    big = buffer.getvalue()
    seconds, peak, outcome = min(_measure(big, limit) for _ in range(3))
    bomb = png_bomb(8000, 5000)
    bomb_seconds, bomb_peak, bomb_outcome = min(_measure(bomb, limit) for _ in range(3))
    return [
        {
            "metric": "decode a 4096x4096 PNG upload",
            "value": seconds,
            "unit": "s",
            "target": None,
            "met": None,
            "detail": f"{len(big) / MIB:.1f} MiB file, best of 3, {outcome}; peak memory +{peak:.0f} MiB "
            "(the RGB pixels alone are 48 MiB; the file's bytes are held too)",
        },
        {
            "metric": "40 MP decompression bomb: extra memory",
            "value": bomb_peak,
            "unit": "MiB",
            "target": "< 50 MiB, refused before decoding",
            "met": bomb_peak < 50 and bomb_outcome.startswith("refused"),
            "detail": f"a {len(bomb)}-byte PNG claiming 8000x5000 (120 MB decoded): {bomb_outcome}, "
            f"in {bomb_seconds * 1000:.2f} ms",
        },
    ]


def run() -> list[dict[str, Any]]:
    return [*_decoding(), _overhead()]


if __name__ == "__main__":  # the decoding figures alone: python -m bench.bench_editing
    for row in _decoding():
        print(row)
