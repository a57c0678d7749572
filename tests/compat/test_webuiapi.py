"""The `webuiapi` package (the A1111 client) against the live service, with Basic auth: txt2img
(seed, batch, sampler + schedule), the options round trip, models, samplers, and progress and
interrupt while a slow job runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import webuiapi
from PIL import Image

from tests.compat.conftest import KEY, Service


def connect(service: Service, password: str = KEY) -> webuiapi.WebUIApi:
    address = urlsplit(service.url)
    # username + password: the constructor calls set_auth, i.e. HTTP Basic with the key as password.
    return webuiapi.WebUIApi(host=address.hostname, port=address.port, username="webui", password=password)


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[webuiapi.WebUIApi]:
    client = connect(service)
    yield client
    client.session.close()


def test_txt2img_seed_batch_and_sampler(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(
        prompt="a red fox in the snow",
        negative_prompt="blurry",
        seed=1234,
        steps=3,
        batch_size=2,
        width=64,
        height=64,
        sampler_name="DPM++ 2M",
        scheduler="karras",
        cfg_scale=6,
    )
    assert len(result.images) == 2 and all(isinstance(image, Image.Image) for image in result.images)
    assert result.images[0].size == (64, 64)
    info = result.info
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 6)
    assert info["infotexts"][1].startswith("a red fox in the snow\nNegative prompt: blurry\n")
    assert "Sampler: DPM++ 2M Karras" in info["infotexts"][1] and "Seed: 1235" in info["infotexts"][1]
    assert result.parameters["seed"] == 1234 and result.parameters["batch_size"] == 2
    # The PNG itself carries the A1111 parameters chunk, and the scheduler that really ran.
    assert "Seed: 1234" in result.images[0].info["parameters"]
    assert '"scheduler": "dpmpp_2m_karras"' in result.images[0].info["imagegen"]


def test_defaults_euler_a_random_seed_and_replay(api: webuiapi.WebUIApi) -> None:
    # webuiapi sends sampler_name="Euler a" and scheduler="automatic" unless told otherwise.
    first = api.txt2img(prompt="a lighthouse", steps=2, width=64, height=64)
    assert first.info["sampler_name"] == "Euler a" and '"scheduler": "euler_a"' in first.image.info["imagegen"]
    seed = first.info["seed"]
    assert seed >= 0 and first.info["all_seeds"] == [seed]
    replay = api.txt2img(prompt="a lighthouse", steps=2, width=64, height=64, seed=seed)
    assert replay.image.tobytes() == first.image.tobytes()


def test_n_iter_times_batch_size(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(
        prompt="a fox",
        seed=5,
        steps=1,
        width=64,
        height=64,
        batch_size=2,
        n_iter=2,
        override_settings={"sd_model_checkpoint": "fake"},
    )
    assert result.info["all_seeds"] == [5, 6, 7, 8] and len(result.images) == 4


def test_options_round_trip(api: webuiapi.WebUIApi, service: Service) -> None:
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "tiny-sd [sd]" and "forge_preset" not in options
    assert api.util_get_current_model() == "tiny-sd [sd]"
    options["some_setting_we_do_not_have"] = 3
    assert api.set_options(options) is None  # the whole dict back: unchanged checkpoint, unknown keys ignored
    try:
        options["sd_model_checkpoint"] = "fake-model [fake]"
        api.set_options(options)
        assert api.get_options()["sd_model_checkpoint"] == "fake-model [fake]"
        result = api.txt2img(prompt="a fox", steps=2, width=64, height=64)
        assert result.info["backend"] == "fake" and result.info["sd_model_checkpoint"] == "fake-model [fake]"
    finally:
        service.restore_default()
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd [sd]"


def test_models_samplers_and_schedulers(api: webuiapi.WebUIApi) -> None:
    titles = api.util_get_model_names()
    assert {"tiny-sd [sd]", "tiny-sdxl [sd]", "fake-model [fake]"} <= set(titles)
    models = {model["title"]: model for model in api.get_sd_models()}
    assert models["tiny-sd [sd]"]["filename"] == "tiny-sd" and len(models["tiny-sd [sd]"]["hash"]) == 10
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert api.util_get_scheduler_names() == ["automatic", "karras"]


def test_progress_and_interrupt_during_a_slow_job(service: Service, api: webuiapi.WebUIApi) -> None:
    outcome: dict = {}

    def generate() -> None:
        worker = connect(service)  # its own session: requests.Session is not for two threads at once
        outcome["result"] = worker.txt2img(
            prompt="a slow fox", steps=60, width=64, height=64, override_settings={"sd_model_checkpoint": "fake"}
        )

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 20
    progress = api.get_progress()
    while progress["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert 0 < progress["progress"] < 1
    assert progress["state"]["sampling_steps"] == 60 and progress["state"]["job_count"] == 1
    assert progress["eta_relative"] > 0 and progress["current_image"] is None
    assert api.interrupt() == {}
    thread.join(timeout=20)
    result = outcome["result"]
    assert result.images == [] and result.info["interrupted"] is True  # A1111 answers 200 after an interrupt
    api.util_wait_for_ready(check_interval=0.05)  # progress 0 and job_count 0 again
    assert api.get_progress()["state"]["job_count"] == 0


def test_wrong_password_and_bad_input_are_clear_errors(service: Service, api: webuiapi.WebUIApi) -> None:
    wrong = connect(service, password="not-the-key")
    with pytest.raises(RuntimeError) as caught:
        wrong.txt2img(prompt="a fox")
    status, text = caught.value.args
    assert status == 401 and KEY not in text
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(prompt="a fox", sampler_name="DPM fast")
    status, text = caught.value.args
    assert status == 422 and "unknown sampler" in text and "sampler_name" in text


# -- img2img ---------------------------------------------------------------------------------------


def test_img2img_with_the_real_client(api: webuiapi.WebUIApi) -> None:
    from tests.support.editing import gradient

    init = gradient(48, 32)
    result = api.img2img(
        images=[init],
        prompt="the same, at night",
        seed=11,
        steps=8,
        denoising_strength=0.5,
        width=48,
        height=32,
        cfg_scale=6,
    )
    assert len(result.images) == 1 and result.images[0].size == (48, 32)
    info = result.info
    assert info["denoising_strength"] == 0.5 and info["mode"] == "img2img" and info["steps"] == 8
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    # A1111 echoes the (large) init images only when asked (include_init_images).
    assert result.parameters["init_images"] is None and result.parameters["denoising_strength"] == 0.5
    again = api.img2img(
        images=[init],
        prompt="the same, at night",
        seed=11,
        steps=8,
        denoising_strength=0.5,
        width=48,
        height=32,
        cfg_scale=6,
        include_init_images=True,
    )
    assert again.images[0].tobytes() == result.images[0].tobytes()
    assert again.parameters["init_images"][0].startswith("data:image/png;base64,")


def test_img2img_inpainting_with_the_real_client(api: webuiapi.WebUIApi) -> None:
    from tests.support.editing import gradient, half_mask

    init, mask = gradient(32, 32), half_mask(32, 32).convert("RGB")
    result = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a window",
        seed=5,
        steps=4,
        width=32,
        height=32,
        denoising_strength=0.75,
        inpainting_fill=1,
        inpaint_full_res=False,
    )
    assert result.images[0].size == (32, 32)
    info = result.info
    assert info["mode"] == "inpaint" and info["is_using_inpainting_conditioning"] is True
    assert info["ignored_parameters"] == []  # fill "original", whole picture: nothing to report
    inverted = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a window",
        seed=5,
        steps=4,
        width=32,
        height=32,
        denoising_strength=0.75,
        inpainting_mask_invert=1,
    )
    assert inverted.images[0].tobytes() != result.images[0].tobytes()
    # webuiapi's defaults (fill 0, "only masked" on) are options this service does not have: reported.
    assert {"inpainting_fill", "inpaint_full_res"} <= set(inverted.info["ignored_parameters"])


def test_img2img_errors_are_a1111_shaped(service: Service) -> None:
    from tests.support.editing import b64, gradient

    bad = service.http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["http://10.0.0.1/a.png"]})
    assert (
        bad.status_code == 422 and bad.json()["param"] == "init_images[0]" and "never fetched" in bad.json()["detail"]
    )
    none = service.http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []})
    assert none.status_code == 422 and none.json()["param"] == "init_images"
    zero = service.http.post(
        "/sdapi/v1/img2img",
        json={"prompt": "x", "init_images": [b64(gradient(16, 16))], "denoising_strength": 0, "steps": 4},
    )
    assert zero.status_code == 422 and zero.json()["param"] == "denoising_strength"
    mismatch = service.http.post(
        "/sdapi/v1/img2img",
        json={"prompt": "x", "init_images": [b64(gradient(16, 16))], "mask": b64(gradient(8, 8))},
    )
    assert mismatch.status_code == 422 and mismatch.json()["param"] == "mask"
