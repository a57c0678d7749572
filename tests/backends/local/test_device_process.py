"""The device process itself (backends/local/host.py, supervisor.py, protocol.py): what crosses the
boundary, how backends are named to it, what the service knows about it, and that the real tiny
pipelines run there. The rules a wedged, cancelled or dying call must obey are proven in
tests/reliability/test_device_deadlines.py."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegen.backends.local.protocol import error_from_dict, error_to_dict, pack_images, unpack_images
from imagegen.backends.local.sd import StableDiffusionBackend
from imagegen.backends.local.supervisor import class_path, start_method
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.errors import JobCancelledError, OutOfMemoryError, QueueFullError, ServiceError
from imagegen.generation import GeneratedImage
from tests.support.process import SERVE, ServiceProcess


def pixels(body: dict[str, Any]) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64"]))).tobytes()


def test_images_cross_the_boundary_as_raw_bytes_unchanged() -> None:
    red = Image.new("RGB", (24, 16), (200, 10, 10))
    grey = Image.new("L", (8, 8), 77)
    batch = [
        [GeneratedImage(seed=1, image=red, info={"bfl_task": "x"}), GeneratedImage(seed=2, image=None, nsfw=True)],
        [GeneratedImage(seed=3, image=grey)],
    ]
    packed = pack_images(batch)
    assert packed[0][0].pixels == red.tobytes() and packed[0][0].size == (24, 16) and packed[0][0].mode == "RGB"
    back = unpack_images(packed)
    assert [[(item.seed, item.nsfw, item.info) for item in row] for row in back] == [
        [(1, False, {"bfl_task": "x"}), (2, True, {})],
        [(3, False, {})],
    ]
    assert back[0][0].image is not None and back[0][0].image.tobytes() == red.tobytes()
    assert back[0][1].image is None
    assert back[1][0].image is not None and back[1][0].image.mode == "L"


@pytest.mark.parametrize(
    "error",
    [
        JobCancelledError("cancelled"),
        OutOfMemoryError("out of memory generating 4 image(s)", param="num_images"),
        QueueFullError("full", retry_after=7),
    ],
)
def test_typed_errors_keep_their_class_status_and_headers_across_the_boundary(error: ServiceError) -> None:
    back = error_from_dict(error_to_dict(error))
    assert type(back) is type(error)
    assert (back.status_code, back.error_type, back.message, back.param, back.headers) == (
        error.status_code,
        error.error_type,
        error.message,
        error.param,
        error.headers,
    )


def test_an_unknown_error_class_becomes_a_service_error_with_the_same_meaning() -> None:
    back = error_from_dict({"class": "NoSuchError", "type": "odd", "message": "m", "param": None, "status_code": 502})
    assert type(back) is ServiceError and back.status_code == 502 and back.error_type == "odd"


def test_local_backends_are_named_to_the_device_process_by_import_path(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert class_path(StableDiffusionBackend(settings)) == "imagegen.backends.local.sd:StableDiffusionBackend"

    class Local(StableDiffusionBackend):  # not importable by path: the device process could not build it
        pass

    with pytest.raises(ValueError, match="importable") as refused:
        BackendRegistry.from_settings(settings, {"sd": Local})
    assert "SD_DEVICE_ISOLATION=thread" in str(refused.value)
    # In a thread of this process any class will do.
    registry = BackendRegistry.from_settings(make_settings(device_isolation="thread"), {"sd": Local})
    assert isinstance(registry.get("sd"), Local) and registry.device_process is None


def test_process_isolation_is_the_default_and_wraps_only_the_local_backends(
    make_settings: Callable[..., Settings],
) -> None:
    registry = BackendRegistry.from_settings(make_settings())
    assert registry.device_process is not None and registry.device_manager is None
    assert sorted(registry.device_process.classes) == ["flux-local", "sd"]
    assert type(registry.get("flux-api")).__name__ == "FluxApiBackend"
    assert start_method() == "forkserver"  # Linux: each device process is a fork of a warm fork server


def test_the_real_tiny_pipelines_run_in_the_device_process(sd_client: httpx.Client) -> None:
    """tiny-sd served from the device process: the same images as before, the device's facts in
    /health and /info, its memory in /metrics."""
    health = sd_client.get("/health").json()["backends"]["sd"]
    process = health["device_process"]
    assert process["isolation"] == "process" and process["state"] == "ready" and process["pid"] > 0
    assert (
        health["state"] == "ready"
        and health["loaded"] is True
        and health["pipeline_class"] == "StableDiffusionPipeline"
    )
    assert health["memory"]["rss_bytes"] > 0  # the device process's memory, where the pipeline is
    info = sd_client.get("/info").json()
    assert info["devices"]["isolation"] == "process" and info["devices"]["torch_loaded"] is True
    assert info["devices"]["cuda"] == []
    metrics = sd_client.get("/metrics").text
    assert "imagegen_device_process_resident_memory_bytes" in metrics
    first = sd_client.post("/api/txt2img", json={"prompt": "a fox", "seed": 5, "steps": 3}).json()
    again = sd_client.post("/api/txt2img", json={"prompt": "a fox", "seed": 5, "steps": 3}).json()
    assert pixels(first) == pixels(again)  # the same seed, the same image
    assert first["images"][0]["width"] == 64  # the native size, learnt from the load in the device process


@pytest.mark.slow
def test_imagegen_serve_keeps_torch_out_of_the_service_process(tmp_path: Path) -> None:
    import psutil

    with ServiceProcess(tmp_path, command=SERVE, ready_timeout=300, SD_MODEL_ID="tiny-sd") as service:
        assert service.client is not None and service.process is not None
        response = service.client.post("/api/txt2img", json={"prompt": "a fox", "seed": 1, "steps": 2})
        assert response.status_code == 200
        device_pid = service.client.get("/health").json()["backends"]["sd"]["device_process"]["pid"]

        def torch_in(pid: int) -> bool:
            return any(Path(item.path).name.startswith("libtorch") for item in psutil.Process(pid).memory_maps())

        assert not torch_in(service.process.pid)
        assert torch_in(device_pid)
    assert not psutil.pid_exists(device_pid) or psutil.Process(device_pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_previews_loras_and_editing_work_in_either_isolation(
    serve: Callable[..., httpx.Client], model_dir: Path, isolation: str
) -> None:
    """What main gained beside the device process, through it and through the thread alike: live
    previews on the event stream (the progress event of the protocol carries them), a LoRA from the
    folder by name (its hash in the image's parameters), and img2img whose input image is stored by
    content on this side and read by the device process from Settings.inputs_dir."""
    import hashlib

    from tests.engine.test_jobs_api import submit
    from tests.support.editing import b64, gradient
    from tests.support.loras import lora_folder
    from tests.support.sse import read_events

    client = serve(device_isolation=isolation, preview_interval=0.001, lora_dir=lora_folder(model_dir))
    sd = client.get("/health").json()["backends"]["sd"]
    assert ("device_process" in sd) == (isolation == "process")

    job = submit(client, prompt="a red fox", steps=4, seed=3, width=64, height=64)
    events = list(read_events(client, f"/api/jobs/{job['id']}/events?previews=true"))
    assert events[-1]["event"] == "succeeded", events[-1]
    assert [event["data"]["step"] for event in events if event["event"] == "preview"] == [1, 2, 3]
    assert [event["data"]["step"] for event in events if event["event"] == "progress"] == [1, 2, 3, 4]

    body = {"prompt": "a red fox", "steps": 3, "seed": 7, "width": 64, "height": 64}
    plain = client.post("/api/txt2img", json=body).json()
    styled = client.post("/api/txt2img", json={**body, "loras": [{"name": "sd-style", "weight": 1.0}]})
    assert styled.status_code == 200, styled.text
    digest = hashlib.sha256((lora_folder(model_dir) / "sd-style.safetensors").read_bytes()).hexdigest()
    assert styled.json()["images"][0]["loras"] == [{"name": "sd-style", "weight": 1.0, "sha256": digest}]
    assert pixels(styled.json()) != pixels(plain)  # the adapter ran where the pipeline lives
    assert pixels(client.post("/api/txt2img", json=body).json()) == pixels(plain)  # never fused

    edited = client.post("/api/img2img", json={**body, "images": [b64(gradient(64, 64))], "strength": 0.5})
    assert edited.status_code == 200, edited.text
    assert edited.json()["parameters"]["mode"] == "img2img"
    assert pixels(edited.json()) != pixels(plain)
