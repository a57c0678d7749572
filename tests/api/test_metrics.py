"""/metrics: scraped and parsed (prometheus_client's parser) after real requests on a live server.
Counters and histograms move by exactly what was done; gauges tell the state; the key guards it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from imagegen import __version__, metrics
from imagegen.backends.local.support import accelerator_memory
from tests.support.scrape import delta, scrape, value

ROOT = Path(__file__).resolve().parents[2]


def test_requests_jobs_images_and_timings_are_counted(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    before = scrape(client)

    assert client.post("/api/txt2img", json={"prompt": "a fox", "seed": 1, "num_images": 2}).status_code == 200
    flagged = client.post("/api/txt2img", json={"prompt": "nsfw fox", "seed": 2})
    assert flagged.status_code == 200 and flagged.json()["images"][0]["nsfw"] is True
    assert client.post("/api/txt2img", json={"prompt": "fail now", "seed": 3}).status_code == 500
    assert client.post("/api/txt2img", json={"prompt": "x", "steps": 0}).status_code == 422
    assert client.get("/api/jobs/" + "0" * 32).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert client.request("BREW", "/api/txt2img").status_code == 405

    after = scrape(client)
    route = {"route": "/api/txt2img", "method": "POST"}
    assert delta(before, after, "imagegen_http_requests_total", **route, status="200") == 2
    assert delta(before, after, "imagegen_http_requests_total", **route, status="500") == 1
    assert delta(before, after, "imagegen_http_requests_total", **route, status="422") == 1
    # Route templates, never raw paths: ids and unknown paths do not create series.
    assert (
        delta(before, after, "imagegen_http_requests_total", route="/api/jobs/{job_id}", method="GET", status="404")
        == 1
    )
    assert delta(before, after, "imagegen_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert not any("/no/such/page" in str(key) or "0" * 32 in str(key) or "BREW" in str(key) for key in after)
    assert delta(before, after, "imagegen_http_requests_total", route="/api/txt2img", method="OTHER", status="405") == 1
    assert delta(before, after, "imagegen_http_request_duration_seconds_count", route="/api/txt2img") == 5

    assert delta(before, after, "imagegen_jobs_total", backend="fake", status="succeeded") == 2
    assert delta(before, after, "imagegen_jobs_total", backend="fake", status="failed") == 1
    assert delta(before, after, "imagegen_images_generated_total", backend="fake") == 2
    assert delta(before, after, "imagegen_images_nsfw_flagged_total", backend="fake") == 1
    # Every job that started waited in the queue; only succeeded ones have a generation time.
    assert delta(before, after, "imagegen_job_queue_wait_seconds_count", backend="fake") == 3
    assert delta(before, after, "imagegen_job_generation_seconds_count", backend="fake") == 2
    assert delta(before, after, "imagegen_job_generation_seconds_sum", backend="fake") > 0
    assert value(after, "imagegen_job_generation_seconds_bucket", backend="fake", le="+Inf") >= 2

    assert value(after, "imagegen_backend_state", backend="fake", state="ready") == 1
    assert value(after, "imagegen_backend_state", backend="fake", state="error") == 0
    assert value(after, "imagegen_backend_state", backend="flux-api", state="not_configured") in (0, 1)
    assert value(after, "imagegen_queue_depth", lane="fake") == 0
    assert value(after, "imagegen_queue_limit") == 64
    assert value(after, "imagegen_process_resident_memory_bytes") > 10_000_000
    assert value(after, "imagegen_info", version=__version__, default_backend="fake") == 1
    # The BFL error counter exists for the flux-api backend, every kind from 0.
    assert ("imagegen_bfl_errors_total", frozenset({("kind", "credits")})) in after


def test_queue_depth_is_read_at_scrape_time(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    factories, holder = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    blocker = client.post("/api/jobs", json={"prompt": "hang", "seed": 1}).json()["id"]
    deadline = time.monotonic() + 10
    while client.get(f"/api/jobs/{blocker}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting = [
        client.post("/api/jobs", json={"prompt": f"wait {i}", "seed": i, "steps": 2 + i}).json()["id"] for i in range(2)
    ]
    during = scrape(client)
    assert value(during, "imagegen_queue_depth", lane="fake") == 2
    assert value(during, "imagegen_jobs_running", lane="fake") == 1
    holder["backend"].release()
    for job_id in [blocker, *waiting]:
        while client.get(f"/api/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert value(scrape(client), "imagegen_queue_depth", lane="fake") == 0


def test_model_loads_and_unloads_are_counted(serve: Callable[..., httpx.Client], tmp_path: Path) -> None:
    first = serve()  # tiny-sd, the default backend, loads at start-up
    loaded = scrape(first)
    assert value(loaded, "imagegen_backend_loaded", backend="sd") == 1
    assert value(loaded, "imagegen_model_loads_total", backend="sd", result="success") >= 1
    assert value(loaded, "imagegen_model_load_seconds_count", backend="sd") >= 1
    first.app.state.services.registry.get("sd").unload()  # type: ignore[attr-defined]
    unloaded = scrape(first)
    assert delta(loaded, unloaded, "imagegen_model_unloads_total", backend="sd") == 1
    assert value(unloaded, "imagegen_backend_loaded", backend="sd") == 0

    broken = serve(model_id=str(tmp_path / "no-such-model"), ready=False)
    deadline = time.monotonic() + 30
    while broken.get("/health").json()["backends"]["sd"]["state"] != "error":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failed = scrape(broken)
    assert delta(unloaded, failed, "imagegen_model_loads_total", backend="sd", result="failure") == 1
    assert value(failed, "imagegen_backend_state", backend="sd", state="error") == 1


def test_disk_usage_of_models_and_outputs(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    client.post("/api/txt2img", json={"prompt": "a fox", "seed": 1})
    services = client.app.state.services  # type: ignore[attr-defined]
    services.disk.refresh()  # the background measurement, made now so the numbers are known
    samples = scrape(client)
    assert value(samples, "imagegen_disk_files", folder="outputs") == 1
    assert value(samples, "imagegen_disk_usage_bytes", folder="outputs") > 0
    assert value(samples, "imagegen_disk_free_bytes", folder="models") > 0


def test_metrics_need_the_key_unless_public(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    factories, _ = fake_factory()
    guarded = serve(factories=factories, default_backend="fake", api_key="k-123")
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"X-API-Key": "k-123"}).status_code == 200
    factories, _ = fake_factory()
    public = serve(factories=factories, default_backend="fake", api_key="k-123", metrics_public=True)
    assert public.get("/metrics").status_code == 200
    assert public.get("/info").status_code == 401  # only /metrics became public
    assert "k-123" not in public.get("/metrics").text


def test_bfl_error_kinds_are_bounded() -> None:
    before = metrics.BFL_ERRORS.labels(kind="other")._value.get()
    metrics.record_bfl_error("credits")
    metrics.record_bfl_error("some text from an upstream body")
    assert metrics.BFL_ERRORS.labels(kind="other")._value.get() == before + 1


def test_many_apps_in_one_process_and_no_torch_import(tmp_path: Path) -> None:
    """Collectors are defined once: building and scraping several apps never raises "Duplicated
    timeseries". And metrics never import torch (a fresh process, where nothing else did)."""
    code = """
import sys, httpx
from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.server import LiveServer, wait_ready
for index in range(3):
    settings = Settings(_env_file=None, output_dir=sys.argv[1] + f"/o{index}", data_dir=sys.argv[1] + f"/d{index}",
                        model_dir=sys.argv[1] + "/m", host="127.0.0.1", log_level="warning")
    app = create_app(settings, backend_factories={"fake": FakeBackend}, default_backend="fake")
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as client:
        wait_ready(client)
        client.post("/api/txt2img", json={"prompt": "x", "seed": 1})
        assert client.get("/metrics").status_code == 200
        assert client.get("/info").status_code == 200
heavy = sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules)
print("HEAVY", heavy)
"""
    env = {key: val for key, val in os.environ.items() if not key.startswith("SD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_gpu_memory_is_empty_without_an_accelerator() -> None:
    # This machine has no GPU; where torch is loaded and CUDA is available the same function
    # reports allocated/reserved/total per device (checked on a GPU machine; see docs/operations.md).
    found: list[Any] = accelerator_memory()
    import torch

    if not torch.cuda.is_available():
        assert found == []
    else:
        assert found and all(kind in ("allocated", "reserved", "total") for _, kind, _ in found)


def test_scrape_while_requests_run(serve: Callable[..., httpx.Client], fake_factory) -> None:  # type: ignore[no-untyped-def]
    """Scrapes and generations at once: every scrape parses, and totals add up at the end."""
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    before = scrape(client)
    errors: list[BaseException] = []

    def generate(seed: int) -> None:
        try:
            assert client.post("/api/txt2img", json={"prompt": "a fox", "seed": seed}).status_code == 200
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(5):
        scrape(client)
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert delta(before, scrape(client), "imagegen_jobs_total", backend="fake", status="succeeded") == 8
