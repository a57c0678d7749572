"""End to end on a real pipeline: an API replica that loads no model, and `imagegen worker --backend sd`
in its own process running the built-in tiny-sd through diffusers; the image the replica returns was
generated and stored by the worker."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
from PIL import Image

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.cluster import unique_prefix
from tests.support.process import WorkerProcess
from tests.support.redis_server import RedisServer
from tests.support.server import LiveServer, wait_ready


def test_tiny_sd_on_a_real_worker(tmp_path: Path, model_dir: Path, redis_server: RedisServer) -> None:
    values = {
        "redis_url": redis_server.url,
        "redis_prefix": unique_prefix(),
        "model_id": "tiny-sd",
        "model_dir": model_dir,
        "output_dir": tmp_path / "outputs",
        "data_dir": tmp_path / "data",
        "host": "127.0.0.1",
        "log_level": "warning",
        "worker_lease_seconds": 5.0,
    }
    env = {f"SD_{key.upper()}": str(value) for key, value in values.items()}
    worker = WorkerProcess(tmp_path, backends=("sd",), factories=(), ready_timeout=120, **env).start()
    try:
        app = create_app(Settings(_env_file=None, **values))
        with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=180) as client:
            health = wait_ready(client, timeout=180)  # ready once the worker reports sd ready
            (described,) = health["backends"]["sd"]["workers"]
            assert described["name"] == worker.name and described["models"] == ["tiny-sd"]
            response = client.post("/api/txt2img", json={"prompt": "a red fox", "seed": 7, "steps": 2, "num_images": 2})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["backend"] == "sd" and body["model"] == "tiny-sd"
            for image, seed in zip(body["images"], (7, 8), strict=True):
                assert image["seed"] == seed
                decoded = Image.open(io.BytesIO(base64.b64decode(image["b64"])))
                assert decoded.size == (64, 64)
                assert "a red fox" in decoded.text["parameters"]  # the worker embedded the parameters
            loaded = client.get("/api/backends").json()["backends"]
            sd = next(backend for backend in loaded if backend["id"] == "sd")
            assert sd["state"] == "ready" and sd["loaded"] is True and sd["device"] == "cpu"
    finally:
        worker.stop()
