"""/health (readiness, states while loading and after failures), /health/live, /api/backends, /info."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from imagegen.backends.local.base import LoadedPipeline
from imagegen.backends.local.sd import StableDiffusionBackend
from imagegen.config import Settings


class GatedStableDiffusionBackend(StableDiffusionBackend):
    """The real sd backend whose load waits for a gate, so a test can look at /health mid-load. The
    gate is a file (SD_DATA_DIR/load-gate): the load runs in the device process."""

    def load_pipeline(self) -> LoadedPipeline:
        gate = self.settings.data_dir / "load-gate"
        deadline = time.monotonic() + 60
        while not gate.exists():
            assert time.monotonic() < deadline, "the gate was never opened"
            time.sleep(0.02)
        return super().load_pipeline()


def test_health_is_503_while_loading_then_200(
    serve: Callable[..., httpx.Client], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    client = serve(settings, factories={"sd": GatedStableDiffusionBackend}, ready=False)
    loading = client.get("/health")
    assert loading.status_code == 503
    body = loading.json()
    assert body["status"] == "loading" and body["default_backend"] == "sd"
    assert body["backends"]["sd"]["state"] == "loading"
    assert client.get("/health/live").status_code == 200

    # A request sent while loading waits for the model instead of failing.
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(response=client.post("/api/txt2img", json={"prompt": "x", "steps": 2}))
    )
    worker.start()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "load-gate").touch()
    worker.join(60)
    assert result["response"].status_code == 200

    ready = client.get("/health")
    assert ready.status_code == 200
    sd = ready.json()["backends"]["sd"]
    assert sd["state"] == "ready" and sd["loaded"] is True
    assert sd["device"] == "cpu" and sd["dtype"] == "float32" and sd["model"] == "tiny-sd"
    assert sd["memory"]["rss_bytes"] > 0
    assert ready.json()["backends"]["flux-api"]["state"] in {"not_configured", "ready"}


def test_missing_local_model_folder_is_an_error_with_a_reason(serve: Callable[..., httpx.Client], tmp_path) -> None:
    client = serve(model_id=str(tmp_path / "no-such-model"), ready=False)
    body = _wait_state(client, "error")
    assert "does not exist" in body["backends"]["sd"]["reason"]
    response = client.post("/api/txt2img", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "backend_unavailable"
    assert "does not exist" in response.json()["error"]["message"]


def test_uncached_hub_model_offline_explains_what_to_do(serve: Callable[..., httpx.Client]) -> None:
    client = serve(model_id="someone/not-cached-model", ready=False)
    reason = _wait_state(client, "error")["backends"]["sd"]["reason"]
    assert "not in the model cache" in reason and "SD_HUGGINGFACE_TOKEN" in reason


def _wait_state(client: httpx.Client, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        body = response.json()
        if body["backends"]["sd"]["state"] == state:
            assert response.status_code == (200 if state == "ready" else 503)
            return body
        time.sleep(0.05)
    raise AssertionError(f"sd never reached {state}: {body}")


def test_backends_listing(sd_client: httpx.Client) -> None:
    body = sd_client.get("/api/backends").json()
    assert body["default"] == "sd"
    by_id = {backend["id"]: backend for backend in body["backends"]}
    assert set(by_id) >= {"sd", "flux-local", "flux-api"}
    sd = by_id["sd"]
    assert sd["default"] is True and sd["state"] == "ready" and sd["family"] == "sd"
    caps = sd["capabilities"]
    assert caps["size_multiple"] == 8 and caps["default_size"] == [64, 64]
    assert "euler_a" in caps["schedulers"] and "dpmpp_2m_karras" in caps["schedulers"]
    assert caps["max_width"] == 2048 and caps["max_steps"] == 150


def test_info_reports_versions_devices_limits_and_no_secrets(serve: Callable[..., httpx.Client]) -> None:
    canary = "sk-canary-7731"
    client = serve(api_key=canary, huggingface_token=canary + "hf", headers={"X-API-Key": canary})
    info = client.get("/info")
    assert info.status_code == 200
    body = info.json()
    assert body["version"] and body["default_backend"] == "sd"
    assert body["versions"]["torch"].startswith("2.13") and body["versions"]["diffusers"]
    assert body["devices"]["cuda"] == [] and body["devices"]["mps"] is False
    assert body["limits"]["max_steps"] == 150
    assert body["auth_enabled"] is True
    assert body["output_dir"].endswith("outputs")
    for path in ("/info", "/health", "/api/backends"):
        assert canary not in client.get(path).text


def test_settings_limits_are_applied(serve: Callable[..., httpx.Client]) -> None:
    client = serve(max_steps=5, max_width=128)
    caps = client.get("/api/backends").json()["backends"][0]["capabilities"]
    assert caps["max_steps"] == 5 and caps["max_width"] == 128
    response = client.post("/api/txt2img", json={"prompt": "x", "steps": 6})
    assert response.status_code == 422 and response.json()["error"]["param"] == "steps"
