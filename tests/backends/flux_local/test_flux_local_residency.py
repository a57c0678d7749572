"""sd and flux-local share one device: which pipelines stay loaded, idle unloading, reloading.

Memory is checked for real: the RSS of the device process that holds the pipelines falls back.
The model used for that carries ~120 MiB of ballast weights, stored in bfloat16 like real FLUX
checkpoints, so that loading it in float32 really costs process memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from imagegen.backends.local import tiny_models
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.services import build_services
from tests.backends.flux_local.helpers import backend_health, generate, pixels
from tests.support.fake_backend import FakeBackend

BALLAST_ROWS = 1_000_000  # x 32 floats = 128 MB in float32, 64 MB on disk in bfloat16


def _loaded(client: httpx.Client) -> dict[str, bool]:
    listed = client.get("/api/backends").json()["backends"]
    return {item["id"]: item["loaded"] for item in listed if item["id"] in ("sd", "flux-local")}


def _wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _idle_unloads(client: httpx.Client) -> int:
    """How many unloads have finished, memory release included (last_unload is recorded after it)."""
    return backend_health(client, "flux-local").get("last_unload", {}).get("count", 0)


def test_one_pipeline_at_a_time_switching_in_any_order(serve: Callable[..., httpx.Client]) -> None:
    """SD_MAX_LOADED_PIPELINES=1 (the GPU default): each switch unloads the other backend."""
    client = serve(model_id="tiny-sd", flux_model_id="tiny-flux", max_loaded_pipelines=1)
    first: dict[str, bytes] = {}
    for backend in ("sd", "flux-local", "flux-local", "sd", "flux-local", "sd"):
        body = generate(client, backend=backend, seed=21, steps=2)
        image = pixels(body["images"][0]).tobytes()
        # Reloading gives the same model back: the same seed gives the same image.
        assert first.setdefault(backend, image) == image
        loaded = _loaded(client)
        assert loaded["sd"] is (backend == "sd") and loaded["flux-local"] is (backend == "flux-local")
    sd = backend_health(client, "sd")
    assert sd["loaded"] is True and sd["residency"]["loaded_pipelines"] == ["sd"]
    assert sd["residency"]["max_loaded_pipelines"] == 1
    flux = backend_health(client, "flux-local")
    assert flux["state"] == "ready" and flux["loaded"] is False
    assert "make room for sd" in flux["reason"] and "SD_MAX_LOADED_PIPELINES=1" in flux["last_unload"]["reason"]

    # Requests for both backends arriving together: the engine serialises them on the local lane
    # and every switch unloads the other pipeline first; every request succeeds.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(
            pool.map(
                lambda index: client.post(
                    "/api/txt2img",
                    json={"prompt": "mixed", "backend": ("sd", "flux-local")[index % 2], "seed": index, "steps": 2},
                ),
                range(4),
            )
        )
    assert [response.status_code for response in bodies] == [200] * 4
    assert sum(_loaded(client).values()) == 1


def test_a_request_during_the_start_up_load_of_the_other_backend(
    serve: Callable[..., httpx.Client], make_settings: Callable[..., Settings]
) -> None:
    """flux-local loads at start-up (default backend) while an sd request arrives, one pipeline
    allowed: the loads take turns, nothing deadlocks, and one pipeline is left loaded."""
    settings = make_settings(
        model_id="tiny-sd", flux_model_id="tiny-flux2-klein", default_backend="flux-local", max_loaded_pipelines=1
    )
    client = serve(settings, ready=False)
    assert generate(client, backend="sd", seed=2, steps=2)["backend"] == "sd"
    _wait_until(lambda: backend_health(client, "flux-local")["state"] == "ready")
    assert client.get("/health").status_code == 200
    # The device process reports each backend's health as it changes: the unload that made room may
    # reach the service a moment after the load it made room for.
    _wait_until(lambda: sum(_loaded(client).values()) == 1)
    assert generate(client, seed=2)["backend"] == "flux-local"
    assert _loaded(client) == {"sd": False, "flux-local": True}


def test_cpu_default_keeps_both_pipelines(serve: Callable[..., httpx.Client]) -> None:
    """SD_MAX_LOADED_PIPELINES=0 (auto) is 2 on CPU: no reload when alternating."""
    client = serve(model_id="tiny-sd", flux_model_id="tiny-flux")
    generate(client, backend="sd", seed=1, steps=2)
    generate(client, backend="flux-local", seed=1, steps=2)
    assert _loaded(client) == {"sd": True, "flux-local": True}
    residency = backend_health(client, "flux-local")["residency"]
    assert residency["max_loaded_pipelines"] == 2 and sorted(residency["loaded_pipelines"]) == ["flux-local", "sd"]


def test_idle_pipeline_is_unloaded_memory_released_and_reloaded(
    serve: Callable[..., httpx.Client],
    make_settings: Callable[..., Settings],
    build_fixture_model: Callable[..., Path],
    tiny_checker: Path,
) -> None:
    folder = build_fixture_model(
        "flux-ballast", tiny_models.build_tiny_flux, t5_vocab_rows=BALLAST_ROWS, save_dtype="bfloat16"
    )
    idle = 2.0
    # flux-local is the default backend, so it also loads at start-up (and idles out first).
    client = serve(
        make_settings(
            flux_model_id=str(folder),
            safety_checker_id=str(tiny_checker),
            default_backend="flux-local",
            model_idle_unload_seconds=idle,
        )
    )
    # The pipeline lives in the device process: its memory is what /health reports (that process's RSS).
    _wait_until(lambda: _idle_unloads(client) == 1)  # loaded at start-up, then idle
    unloaded_rss = backend_health(client, "flux-local")["memory"]["rss_bytes"]

    first = generate(client, seed=5, steps=2)
    health = backend_health(client, "flux-local")  # read before it idles out again
    assert health["loaded"] is True, "unloaded within the idle time"
    loaded_rss = health["memory"]["rss_bytes"]
    assert loaded_rss - unloaded_rss > 64 * 2**20, (loaded_rss, unloaded_rss)

    _wait_until(lambda: _idle_unloads(client) == 2)
    health = backend_health(client, "flux-local")
    assert "idle" in health["reason"] and "SD_MODEL_IDLE_UNLOAD_SECONDS" in health["last_unload"]["reason"]
    assert health["state"] == "ready" and health["residency"]["idle_unload_seconds"] == idle
    # Nothing keeps the unloaded pipeline alive: the device process's memory falls back.
    assert health["memory"]["rss_bytes"] < loaded_rss - 64 * 2**20, "RSS did not fall back after unloading"

    again = generate(client, seed=5, steps=2)
    assert pixels(again["images"][0]).tobytes() == pixels(first["images"][0]).tobytes()


def test_unloading_keeps_the_other_settings_visible(serve: Callable[..., Any]) -> None:
    """An unloaded backend still answers /api/backends with its model and capabilities (no load)."""
    client = serve(model_id="tiny-sd", flux_model_id="tiny-flux2-klein", default_backend="sd")
    listed = {item["id"]: item for item in client.get("/api/backends").json()["backends"]}
    flux = listed["flux-local"]
    assert flux["loaded"] is False and flux["state"] == "ready" and flux["model"] == "tiny-flux2-klein"
    assert flux["capabilities"]["default_steps"] == 4 and flux["capabilities"]["size_multiple"] == 16
    assert "loads on the first request" in flux["reason"]


def _idle_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "idle-unload" and not task.done()]


async def test_the_registry_owns_the_device_manager_and_starts_it_once(
    make_settings: Callable[..., Settings],
) -> None:
    """One manager for both local backends; their own start/close leave it alone; the registry
    (started and stopped with the services, by the app's lifespan or the CLI) runs its idle task once.

    In this process, so with SD_DEVICE_ISOLATION=thread: in a device process, that process's own
    manager runs its idle task (test_idle_pipeline_is_unloaded_memory_released_and_reloaded)."""
    settings = make_settings(flux_model_id="tiny-flux", model_idle_unload_seconds=60, device_isolation="thread")
    registry = BackendRegistry.from_settings(settings, {"fake": FakeBackend}, default_id="fake")
    manager = registry.device_manager
    assert manager is not None
    local = [registry.get("sd"), registry.get("flux-local")]
    assert all(getattr(backend, "device_manager", None) is manager for backend in local)
    for backend in local:
        await backend.start()
    assert _idle_tasks() == []
    for backend in local:
        await backend.close()

    services = build_services(settings, backend_factories={"fake": FakeBackend}, default_backend="fake", upkeep=False)
    await services.start()
    try:
        assert len(_idle_tasks()) == 1
    finally:
        await services.stop(grace=0)
    assert _idle_tasks() == []
