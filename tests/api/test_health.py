"""/health (readiness, states while loading and after failures), /health/live, /api/backends, /info."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
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


def test_a_backend_that_cannot_load_offline_is_not_ready_before_any_request(
    serve: Callable[..., httpx.Client], tmp_path: Path
) -> None:
    """Not the default (nothing loads it at start): its state comes from the model cache, read without
    downloading, while HF_HUB_OFFLINE is set (as in every test)."""
    client = serve(flux_model_id="someone/flux-not-cached", model_dir=tmp_path / "models", safety_checker=False)
    flux = client.get("/health").json()["backends"]["flux-local"]
    assert flux["state"] == "error"
    assert flux["reason"] == (
        "'someone/flux-not-cached' is not in the model cache (SD_MODEL_DIR) and HF_HUB_OFFLINE is set: "
        "run `imagegen models pull someone/flux-not-cached` where the network works, then start again"
    )
    assert client.get("/health").status_code == 200  # the default backend (sd) is what readiness follows

    # `imagegen models pull` where the network works fills the cache (here: the cache layout by hand);
    # A1111's refresh-checkpoints makes the service look again at once.
    repo = tmp_path / "models" / "models--someone--flux-not-cached"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    flux = client.get("/health").json()["backends"]["flux-local"]
    assert flux["state"] == "ready" and flux["reason"] == "not loaded; loads on the first request"


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
    assert sd["default_model"] == "tiny-sd" and sd["model_capabilities"] is None  # one model: nothing to pick
    flux_api = by_id["flux-api"]  # several models: each one's capabilities, for the page's model picker
    assert flux_api["default_model"] == "flux-2-klein-4b"
    assert set(flux_api["model_capabilities"]) == set(flux_api["capabilities"]["models"])


def test_each_model_of_a_backend_has_its_capabilities(serve: Callable[..., httpx.Client]) -> None:
    client = serve(models=["tiny-sdxl"])
    sd = next(item for item in client.get("/api/backends").json()["backends"] if item["id"] == "sd")
    assert sd["capabilities"]["models"] == ["tiny-sd", "tiny-sdxl"] and sd["default_model"] == "tiny-sd"
    per_model = sd["model_capabilities"]
    assert (per_model["tiny-sd"]["default_steps"], per_model["tiny-sd"]["default_guidance"]) == (25, 7.5)
    assert (per_model["tiny-sdxl"]["default_steps"], per_model["tiny-sdxl"]["default_guidance"]) == (30, 5.0)


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


def test_public_health_is_states_and_reasons_only(serve: Callable[..., httpx.Client], fake_factory) -> None:
    """Without the key (one is set): no BFL host or credit balance, no memory, no pipeline, no version.
    With it, /health keeps every detail."""
    from tests.support.fake_bfl import FakeBFL
    from tests.support.server import LiveServer

    key = "health-key-4411"
    fake_bfl = FakeBFL(api_key="bfl_health", generation_time=0.01, credits=123.0)
    with LiveServer(fake_bfl.app) as bfl:
        factories, _ = fake_factory()
        client = serve(
            api_key=key,
            bfl_api_key="bfl_health",
            bfl_api_url=bfl.url,
            factories={**factories, "sd": GatedStableDiffusionBackend},
            default_backend="fake",
            ready=False,
        )
        import time

        deadline = time.monotonic() + 30
        while (
            client.get("/health", headers={"X-API-Key": key}).json()["backends"]["flux-api"].get("key_check")
            == "unchecked"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        full = client.get("/health", headers={"X-API-Key": key})
        public = client.get("/health")
    assert full.status_code == public.status_code == 200
    body = public.json()
    assert set(body) == {"status", "default_backend", "backends", "queue"}
    assert body["status"] == "ok" and body["default_backend"] == "fake"
    for name, backend in body["backends"].items():
        assert set(backend) == {"state", "reason"}, name
    assert body["backends"]["flux-api"] == {"state": "ready", "reason": "ready"}
    host = bfl.url.removeprefix("http://")
    for secretish in (host, "123", "credits", "rss", "memory", "Pipeline", "version", "cpu", "float32"):
        assert secretish not in public.text, secretish
    # The key holder sees it all.
    detailed = full.json()
    assert detailed["version"] and detailed["backends"]["flux-api"]["credits"] == 123.0
    assert host in detailed["backends"]["flux-api"]["api_host"]
    # A wrong key is the same as none (no 401 on a public route either).
    wrong = client.get("/health", headers={"X-API-Key": key + "x"})
    assert wrong.status_code == 200 and wrong.json() == body


def test_without_a_key_set_health_keeps_its_details(sd_client: httpx.Client) -> None:
    body = sd_client.get("/health").json()
    assert body["version"] and body["backends"]["sd"]["device"] == "cpu"
