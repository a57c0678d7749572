"""LoRAs on the sd backend over real HTTP: tiny LoRAs made with PEFT (tests/support/loras.py) on the
built-in tiny-sd, through the same load_lora_weights / set_adapters path as real ones.

Each point of docs/loras.md is proved on images: a LoRA changes the image, weight 0 is the baseline
byte for byte, a job without LoRAs after one with them is the baseline byte for byte (nothing leaks
through fused weights), every image of a batch gets the LoRA, jobs with other LoRA sets are never
merged into one call, and a LoRA of another family is a 422 naming both."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegen.config import Settings
from imagegen.main import create_app
from tests.backends.flux_local.helpers import generate, pixels
from tests.support.fake_backend import FakeBackend
from tests.support.loras import lora_folder
from tests.support.server import LiveServer, wait_ready

BASE = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 3, "seed": 7}


def start(root: Path, model_dir: Path, **overrides: Any) -> Iterator[httpx.Client]:
    values: dict[str, Any] = dict(
        model_id="tiny-sd",
        models=["tiny-sdxl"],
        flux_model_id="tiny-flux2-klein",
        model_dir=model_dir,
        lora_dir=lora_folder(model_dir),
        output_dir=root / "outputs",
        data_dir=root / "data",
        host="127.0.0.1",
        log_level="warning",
    )
    values.update(overrides)
    app = create_app(Settings(_env_file=None, **values), backend_factories={"fake": lambda s: FakeBackend(s)})
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.app = app  # type: ignore[attr-defined]
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    yield from start(tmp_path_factory.mktemp("sd-loras"), model_dir)


def image_bytes(client: httpx.Client, **body: Any) -> bytes:
    answer = generate(client, **{**BASE, **body})
    return pixels(answer["images"][0]).tobytes()


def lora(name: str, weight: float = 1.0) -> dict[str, Any]:
    return {"name": name, "weight": weight}


def test_a_lora_changes_the_image_weight_zero_and_the_next_job_are_the_baseline(client: httpx.Client) -> None:
    baseline = image_bytes(client)
    styled = image_bytes(client, loras=[lora("sd-style")])
    assert styled != baseline
    assert image_bytes(client, loras=[lora("sd-style", 0.0)]) == baseline
    # A job without LoRAs after one with them: exactly the baseline (adapters are never fused in).
    assert image_bytes(client) == baseline
    assert image_bytes(client, loras=[lora("sd-style")]) == styled  # and the LoRA again: the same image
    half = image_bytes(client, loras=[lora("sd-style", 0.5)])
    assert half not in (baseline, styled)
    # Two at once: a third image, and the baseline again after it.
    both = image_bytes(client, loras=[lora("sd-style", 0.6), lora("sd-unet-only", 0.6)])
    assert both not in (baseline, styled, half)
    assert image_bytes(client) == baseline


def test_every_image_of_a_batch_gets_the_lora(client: httpx.Client) -> None:
    batch = generate(client, **{**BASE, "seed": 40, "num_images": 2}, loras=[lora("sd-style")])
    second = pixels(batch["images"][1]).tobytes()
    alone = image_bytes(client, seed=41, loras=[lora("sd-style")])
    plain = image_bytes(client, seed=41)
    # Batched item i equals the single call to ~1e-6 before quantisation: one level of rounding.
    assert max(abs(a - b) for a, b in zip(alone, second, strict=True)) <= 1
    assert max(abs(a - b) for a, b in zip(plain, second, strict=True)) > 1


def test_jobs_with_other_loras_are_never_merged_into_one_call(client: httpx.Client) -> None:
    """The batch key holds the LoRA set: queued behind a long job, two jobs with the same LoRA are
    merged, the one without LoRAs and the one with another weight run on their own."""
    blocker = client.post("/api/jobs", json={**BASE, "steps": 80, "prompt": "a long job"})
    assert blocker.status_code == 202
    bodies = {
        "same-1": {**BASE, "seed": 1, "loras": [lora("sd-style", 0.8)]},
        "same-2": {**BASE, "seed": 2, "loras": [lora("sd-style", 0.8)]},
        "other-weight": {**BASE, "seed": 3, "loras": [lora("sd-style", 0.4)]},
        "none": {**BASE, "seed": 4},
    }
    ids = {}
    for key, body in bodies.items():
        response = client.post("/api/jobs", json=body)
        assert response.status_code == 202, response.text
        ids[key] = response.json()["id"]
    jobs = {key: wait_job(client, job_id) for key, job_id in ids.items()}
    sizes = {key: job["result"]["timings"]["batch_size"] for key, job in jobs.items()}
    assert sizes == {"same-1": 2, "same-2": 2, "other-weight": 1, "none": 1}
    assert jobs["none"]["parameters"]["loras"] == []
    assert "loras" not in jobs["none"]["result"]["images"][0]
    merged = pixels(jobs["same-2"]["result"]["images"][0]).tobytes()
    alone = image_bytes(client, seed=2, loras=[lora("sd-style", 0.8)])
    assert max(abs(a - b) for a, b in zip(alone, merged, strict=True)) <= 1
    assert pixels(jobs["none"]["result"]["images"][0]).tobytes() == image_bytes(client, seed=4)


def wait_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:") and line.split(":", 1)[1].strip() in ("succeeded", "failed", "cancelled"):
                break
    return client.get(f"/api/jobs/{job_id}").json()


def test_the_image_file_and_the_result_record_the_loras_and_their_hashes(client: httpx.Client, model_dir: Path) -> None:
    digest = hashlib.sha256((lora_folder(model_dir) / "sd-style.safetensors").read_bytes()).hexdigest()
    answer = generate(client, **BASE, loras=[lora("sd-style", 0.8)])
    assert answer["parameters"]["loras"] == [{"name": "sd-style", "weight": 0.8}]
    image = answer["images"][0]
    assert image["loras"] == [{"name": "sd-style", "weight": 0.8, "sha256": digest}]
    png = Image.open(io.BytesIO(client.get(image["url"]).content))
    text = png.info["parameters"]
    assert text.startswith("a red fox in the snow <lora:sd-style:0.8>\n")
    assert f'Lora hashes: "sd-style: {digest[:12]}"' in text
    assert json.loads(png.info["imagegen"])["loras"] == [{"name": "sd-style", "weight": 0.8, "sha256": digest}]
    job = client.get(f"/api/jobs/{answer['id']}", params={"include_images": "false"}).json()
    assert job["parameters"]["loras"] == [{"name": "sd-style", "weight": 0.8}]
    assert job["result"]["images"][0]["loras"][0]["sha256"] == digest


def test_a_lora_of_another_family_is_a_422_naming_both(client: httpx.Client) -> None:
    cases = [
        ({"loras": [lora("sdxl-style")]}, ("'sdxl-style'", "SDXL", "'tiny-sd'")),
        ({"loras": [lora("klein-style")]}, ("'klein-style'", "FLUX.2", "'tiny-sd'")),
        ({"model": "tiny-sdxl", "loras": [lora("sd-style")]}, ("'sd-style'", "'tiny-sdxl'", "SDXL")),
        ({"backend": "flux-local", "loras": [lora("sd-style")]}, ("'sd-style'", "'tiny-flux2-klein'", "FLUX.2")),
    ]
    for extra, words in cases:
        body = {**BASE, "width": 64, "height": 64, **extra}
        response = client.post("/api/txt2img", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "loras" and all(word in error["message"] for word in words), error


def test_a_lora_that_loads_nothing_is_a_422_and_leaves_the_model_clean(client: httpx.Client) -> None:
    """Nothing tells before loading: `mystery` has no family in its names (diffusers then loads
    nothing and only logs a warning: the service counts what was loaded), `sd-unmatched` looks like
    SD but names layers the UNet does not have (PEFT refuses it half-way)."""
    baseline = image_bytes(client)
    for name, says in (("mystery", "none of its layers match"), ("sd-unmatched", "do not match")):
        response = client.post("/api/txt2img", json={**BASE, "loras": [lora(name)]})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "loras" and f"'{name}'" in error["message"] and "'tiny-sd'" in error["message"]
        assert says in error["message"], error
        assert image_bytes(client) == baseline
    assert image_bytes(client, loras=[lora("sd-style", 0.0)]) == baseline
    loaded = [item["name"] for item in client.get("/health").json()["backends"]["sd"]["loras"]["loaded"]]
    assert "sd-style" in loaded and "mystery" not in loaded and "sd-unmatched" not in loaded


def test_names_outside_the_folder_unknown_names_and_pickles_are_refused(client: httpx.Client) -> None:
    for name in ("../outside-loras/secret", "escape", "nope", "a/b", ".hidden", "old-format", "pickled", "x\\y", "a:b"):
        response = client.post("/api/txt2img", json={**BASE, "loras": [lora(name)]})
        assert response.status_code == 422, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == "loras"
        if name not in ("pickled",):
            assert name not in error["message"]  # unknown input is never echoed
    assert "not a safetensors file" in client.post("/api/txt2img", json={**BASE, "loras": [lora("pickled")]}).text
    # A symlink inside the folder is a name for the same file.
    assert image_bytes(client, loras=[lora("alias")]) == image_bytes(client, loras=[lora("sd-style")])


def test_limits_duplicates_and_backends_without_loras(client: httpx.Client) -> None:
    many = [lora(name) for name in ("sd-style", "sd-unet-only", "alias", "sd-unmatched", "sdxl-style")]
    for body, fragment in (
        ({"loras": many}, "at most 4 LoRAs per request (SD_MAX_LORAS)"),
        ({"loras": [lora("sd-style"), lora("sd-style", 0.5)]}, "listed twice"),
        ({"backend": "fake", "loras": [lora("sd-style")]}, "backend 'fake' does not take LoRAs"),
    ):
        response = client.post("/api/txt2img", json={**BASE, **body})
        assert response.status_code == 422 and fragment in response.json()["error"]["message"], response.text
    for bad in ({"name": "sd-style", "weight": 11}, {"name": "sd-style", "scale": 1}, {"name": ""}, {"weight": 1}):
        response = client.post("/api/txt2img", json={**BASE, "loras": [bad]})
        assert response.status_code == 422, response.text
    response = client.post(
        "/api/txt2img",
        content=b'{"prompt": "x", "loras": [{"name": "sd-style", "weight": NaN}]}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)


def test_the_folder_listing(client: httpx.Client, model_dir: Path) -> None:
    listing = client.get("/api/loras").json()["loras"]
    by_name = {entry["name"]: entry for entry in listing}
    # Never a pickle, a .ckpt or a symlink out of the folder.
    assert sorted(by_name) == [
        "alias",
        "klein-other",
        "klein-style",
        "mystery",
        "sd-style",
        "sd-unet-only",
        "sd-unmatched",
        "sdxl-style",
    ]
    style = by_name["sd-style"]
    data = (lora_folder(model_dir) / "sd-style.safetensors").read_bytes()
    assert style["sha256"] == hashlib.sha256(data).hexdigest() and style["size_bytes"] == len(data)
    assert (style["family"], style["cross_attention_dim"], style["filename"]) == ("sd", 32, "sd-style.safetensors")
    assert style["layers"] == 32 + 20  # q, k, v, out of 8 UNet attentions; of 5 CLIP layers
    assert style["fits"] == [{"backend": "sd", "model": "tiny-sd"}]
    assert (by_name["sdxl-style"]["family"], by_name["sdxl-style"]["cross_attention_dim"]) == ("sdxl", 64)
    assert by_name["sdxl-style"]["fits"] == [{"backend": "sd", "model": "tiny-sdxl"}]
    assert by_name["klein-style"]["family"] == "flux2"
    assert by_name["klein-style"]["fits"] == [{"backend": "flux-local", "model": "tiny-flux2-klein"}]
    assert client.get("/api/backends").json()["backends"][0]["capabilities"]["supports_loras"] is True


def test_switching_loras_never_reloads_the_model_and_keeps_at_most_the_limit(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> None:
    for client in start(tmp_path_factory.mktemp("sd-lru"), model_dir, max_loras=2, max_loaded_loras=2):
        first = image_bytes(client, loras=[lora("sd-style")])
        health = client.get("/health").json()["backends"]["sd"]
        load_seconds = health["load_seconds"]
        for name in ("sd-unet-only", "sd-style", "sd-unet-only", "sd-style"):
            image_bytes(client, loras=[lora(name)])
        state = client.get("/health").json()["backends"]["sd"]
        assert state["loras"]["loads"] == 2 and state["loras"]["evictions"] == 0
        assert [item["name"] for item in state["loras"]["loaded"]] == ["sd-unet-only", "sd-style"]
        assert state["loras"]["loaded"][0]["bytes"] > 0
        image_bytes(client, loras=[lora("alias")])  # a third: the least recently used goes
        state = client.get("/health").json()["backends"]["sd"]
        assert [item["name"] for item in state["loras"]["loaded"]] == ["sd-style", "alias"]
        assert state["loras"]["evictions"] == 1
        assert image_bytes(client, loras=[lora("sd-style")]) == first
        # The pipeline itself was loaded once: same load, never unloaded.
        assert state["load_seconds"] == load_seconds and "last_unload" not in state


def test_requests_in_parallel_with_and_without_a_lora_each_get_their_own_image(client: httpx.Client) -> None:
    baseline = image_bytes(client)
    styled = image_bytes(client, loras=[lora("sd-style")])
    results: dict[int, bytes] = {}

    def run(index: int) -> None:
        body = {**BASE, **({"loras": [lora("sd-style")]} if index % 2 else {})}
        answer = client.post("/api/txt2img", json=body)
        results[index] = pixels(answer.json()["images"][0]).tobytes()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(6):
        expected = styled if index % 2 else baseline
        # Merged jobs of the same set: batched item equals the single call to one level of rounding.
        assert max(abs(a - b) for a, b in zip(results[index], expected, strict=True)) <= 1
