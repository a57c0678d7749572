"""The speed modes (backends/local/speed.py) on CPU: SD_COMPILE through the real compile path with
torch's cheap `aot_eager` backend (it traces and runs the compiled graphs, generating no kernels), and
SD_QUANTIZE=fp8 refused where it cannot run."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from imagegen.backends.local.base import LoadState, device_executor
from imagegen.backends.local.flux_local import FluxLocalBackend
from imagegen.backends.local.speed import compiled_graphs
from imagegen.config import Settings, SettingsError, load_settings

COMPILED = {"compile_backend": "aot_eager", "safety_checker": False, "max_batch": 2}


@pytest.fixture(autouse=True)
def _fresh_compiler() -> Any:
    """A warm-up leaves the process in the warm stance with compiled code cached: not for the next test."""
    yield
    import torch

    torch.compiler.set_stance("default")
    torch.compiler.reset()


def pixels(body: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(body["images"][0]["b64"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def generate(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/api/txt2img", json={"prompt": "a lighthouse", "seed": 5, "steps": 3, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_compiled_sd_warms_up_before_ready_then_matches_eager_and_runs_other_sizes_eagerly(
    serve: Callable[..., httpx.Client],
) -> None:
    # Hold the device thread: the warm-up must wait for it (it runs there), so `warming` lasts
    # until the test lets it go.
    # In thread mode: the test holds this process's device thread and counts this process's compiles
    # (test_the_warm_up_runs_in_the_device_process covers the default mode).
    hold = threading.Event()
    device_executor().submit(hold.wait, 120)
    try:
        client = serve(compile="full", compile_sizes=["64x64"], ready=False, device_isolation="thread", **COMPILED)
        deadline = time.monotonic() + 120
        while True:
            health = client.get("/health")
            if health.json()["backends"]["sd"]["state"] == "warming" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert health.status_code == 503
        assert health.json()["status"] == "warming"
        assert "SD_COMPILE" in health.json()["backends"]["sd"]["reason"]
        graphs_before = compiled_graphs()
    finally:
        hold.set()
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.1)
    warm = compiled_graphs()
    assert warm > graphs_before  # the warm-up compiled (the UNet and the VAE decoder)

    speed = client.get("/info").json()["speed_modes"]
    assert speed["compile"] == "full" and speed["compile_backend"] == "aot_eager"
    status = speed["backends"]["sd"]
    assert status["warmed"] == ["64x64x1", "64x64x2"]  # every batch size up to SD_MAX_BATCH
    assert status["compile_scope"] == "whole UNet2DConditionModel and the VAE decoder"
    model_dir = client.app.state.services.settings.model_dir  # type: ignore[attr-defined]
    assert status["compile_cache"].startswith(str(model_dir.resolve()))
    assert client.get("/health").json()["backends"]["sd"]["speed_modes"]["compiled_graphs"] == warm - graphs_before

    compiled = generate(client, width=64, height=64)
    two = client.post(
        "/api/txt2img",
        json={"prompt": "a lighthouse", "seed": 5, "steps": 3, "width": 64, "height": 64, "num_images": 2},
    )
    assert two.status_code == 200
    unusual = generate(client, width=80, height=72)
    assert compiled_graphs() == warm  # warmed shapes reuse their graphs; 80x72 ran eagerly, no compile
    assert pixels(unusual).shape == (72, 80, 3)

    eager_client = serve(**{**COMPILED, "compile": "off", "device_isolation": "thread"})
    eager = generate(eager_client, width=64, height=64)
    assert "speed_modes" not in eager_client.get("/health").json()["backends"]["sd"]
    difference = np.abs(pixels(compiled) - pixels(eager))
    assert difference.max() <= 2, difference.max()  # the same image, up to rounding


def test_the_warm_up_runs_in_the_device_process(serve: Callable[..., httpx.Client]) -> None:
    """The default mode: the pipeline, its compile and its warm-up live in the device process; the
    service learns of them from its reports (a compile counted there, none here)."""
    before = compiled_graphs()
    client = serve(compile="full", compile_sizes=["64x64"], ready=False, **COMPILED)
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.1)
    status = client.get("/info").json()["speed_modes"]["backends"]["sd"]
    assert status["warmed"] == ["64x64x1", "64x64x2"]
    reported = client.get("/health").json()["backends"]["sd"]
    assert reported["speed_modes"]["compiled_graphs"] > 0  # counted in the device process
    assert reported["device_process"]["pid"] not in (None, os.getpid())
    assert pixels(generate(client, width=64, height=64)).shape == (64, 64, 3)
    assert compiled_graphs() == before  # nothing compiled in the service process


def test_regional_compile_of_a_flux_transformer_matches_eager(make_settings: Callable[..., Settings]) -> None:
    from imagegen.backends.base import RunContext
    from imagegen.backends.conditioning import Conditioning
    from imagegen.generation import GenerationParams

    images = {}
    for mode in ("regional", "off"):
        backend = FluxLocalBackend(
            make_settings(flux_model_id="tiny-flux2-klein", compile=mode, compile_sizes=["64x64"], **COMPILED)
        )
        loaded = device_executor().submit(backend.ensure_loaded).result()  # the warm-up runs inline there
        assert backend._state is LoadState.READY
        request = backend.resolve(GenerationParams(prompt="a fox", width=64, height=64, steps=2, seed=3))
        before = compiled_graphs()
        output = device_executor().submit(
            backend.run_pipeline, loaded, [request], RunContext(["x"], time.monotonic() + 60), Conditioning()
        )
        images[mode] = output.result()
        assert compiled_graphs() == before
        if mode == "regional":
            status = backend.health().details["speed_modes"]
            assert status["warmed"] == ["64x64x1", "64x64x2"]
            assert "Flux2TransformerBlock" in status["compile_scope"]
            # Every repeated block of a class shares one compiled graph per shape.
            assert status["compiled_graphs"] < 2 * len(list(loaded.pipe.transformer.modules()))
        backend.unload()
    assert np.allclose(images["regional"], images["off"], atol=1e-4)


def test_a_failed_warm_up_falls_back_to_eager_and_the_backend_serves(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.backends.local.sd import StableDiffusionBackend

    backend = StableDiffusionBackend(
        make_settings(compile="regional", compile_sizes=["64x64", "8192x8192"], **COMPILED)
    )
    real = backend.run_pipeline

    def compiler_breaks(*args: Any) -> Any:
        raise RuntimeError("inductor: the compiler gave up\nlong trace")

    monkeypatch.setattr(backend, "run_pipeline", compiler_breaks)
    loaded = device_executor().submit(backend.ensure_loaded).result()
    status = backend.health().details["speed_modes"]
    assert status["compile"] == "failed"
    assert status["compile_error"] == "RuntimeError: inductor: the compiler gave up"
    assert any(entry.startswith("8192x8192:") for entry in status["skipped"])  # over SD_MAX_PIXELS
    assert backend.availability().state.value == "ready"
    assert all(module._compiled_call_impl is None for module in loaded.pipe.unet.modules())
    monkeypatch.setattr(backend, "run_pipeline", real)
    backend.unload()


def test_fp8_is_a_configuration_error_on_cpu_and_mps() -> None:
    for device in ("cpu", "mps"):
        with pytest.raises(SettingsError) as refused:
            load_settings(_env_file=None, device=device, quantize="fp8")
        assert f"SD_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer; SD_DEVICE={device}" in str(
            refused.value
        )
        assert "set SD_QUANTIZE=off" in str(refused.value)


def test_fp8_on_a_machine_without_a_suitable_gpu_is_refused_at_start(serve: Callable[..., httpx.Client]) -> None:
    # SD_DEVICE=auto resolves to the CPU here: the load (at start, the default backend preloads) is
    # refused before a weight is read, and /health says why; requests get 503, not a 4xx.
    client = serve(quantize="fp8", ready=False)
    deadline = time.monotonic() + 60
    while (sd := client.get("/health").json()["backends"]["sd"])["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sd["state"] == "error"
    assert "SD_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer; the device is cpu" in sd["reason"]
    status = client.get("/info").json()["speed_modes"]["backends"]["sd"]
    assert status["quantize"] == "refused" and "set SD_QUANTIZE=off" in status["quantize_refused"]
    answer = client.post("/api/txt2img", json={"prompt": "a fox", "steps": 2})
    assert answer.status_code == 503


@pytest.mark.parametrize("sizes", ["1024", "1024x1023", "8x8", "axb"])
def test_compile_sizes_are_checked(sizes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_COMPILE_SIZES", sizes)
    with pytest.raises(SettingsError, match="SD_COMPILE_SIZES"):
        load_settings(_env_file=None)


def test_compile_sizes_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_COMPILE_SIZES", "1024x1024, 768X1344")
    assert load_settings(_env_file=None).compile_sizes == ["1024x1024", "768x1344"]
