"""Replays of the exact requests real integrations send (read from their source code): Open WebUI's
Automatic1111 and OpenAI image engines, n8n's legacy OpenAI node, LibreChat's Stable Diffusion tool
and SillyTavern's SD WebUI source. Plain HTTP with each client's own headers and bodies."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.compat.conftest import KEY, Service


@pytest.fixture
def fake_default(service: Service) -> Iterator[None]:
    """The fake backend as the default: these clients send no steps, and the request and answer shapes
    are the point, not the model's default 25 steps on a shared CPU (the SDK tests cover sd itself)."""
    service.app.state.services.registry.set_default("fake")
    yield
    service.restore_default()


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


# -- Open WebUI, engine "Automatic1111" (backend/open_webui/routers/images.py) --------------------


def test_open_webui_automatic1111_engine(service: Service) -> None:
    # AUTOMATIC1111_API_AUTH = "user:key": every call sends `authorization: Basic base64(user:key)`.
    headers = {"authorization": basic(f"openwebui:{KEY}")}
    with httpx.Client(base_url=service.url, headers=headers, timeout=120) as http:
        # Admin > Images: "verify" is GET options + raise_for_status; the model list is sd-models,
        # shown as {"id": title, "name": model_name}.
        assert http.get("/sdapi/v1/options").status_code == 200
        models = [
            {"id": model["title"], "name": model["model_name"]} for model in http.get("/sdapi/v1/sd-models").json()
        ]
        assert {"id": "tiny-sd [sd]", "name": "tiny-sd"} in models
        # set_image_model: read the options, and post the whole dict back only if the model differs.
        options = http.get("/sdapi/v1/options").json()
        model = "tiny-sd [sd]"
        assert model == options["sd_model_checkpoint"]  # unchanged: Open WebUI posts nothing
        options["sd_model_checkpoint"] = model
        http.post("/sdapi/v1/options", json=options).raise_for_status()  # posting it anyway is harmless
        # get_image_model reads the current checkpoint back.
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model
        # image_generations: size from IMAGE_SIZE, steps from IMAGE_STEPS, n as batch_size.
        data = {
            "prompt": "a red fox in the snow",
            "batch_size": 2,
            "width": 64,
            "height": 64,
            "steps": 3,
            "negative_prompt": "blurry",
        }
        response = http.post("/sdapi/v1/txt2img", json=data)
        res = response.json()  # Open WebUI reads the JSON without checking the status
        assert response.status_code == 200
        assert len(res["images"]) == 2
        for image in res["images"]:
            assert "," not in image  # no data: prefix: Open WebUI decodes it as bare base64 PNG
            assert png(image).size == (64, 64)
        assert isinstance(res["info"], str) and json.loads(res["info"])["all_seeds"]


def test_open_webui_automatic1111_engine_without_auth_is_refused(service: Service) -> None:
    # Without AUTOMATIC1111_API_AUTH Open WebUI sends an empty authorization header.
    response = httpx.get(f"{service.url}/sdapi/v1/options", headers={"authorization": ""})
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")


# -- Open WebUI, engine "OpenAI" ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "sends_response_format"),
    [("dall-e-2", True), ("dall-e-3", True), ("gpt-image-1", False)],  # gpt-image*: no response_format
)
@pytest.mark.usefixtures("fake_default")
def test_open_webui_openai_engine(service: Service, model: str, sends_response_format: bool) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = {"model": model, "prompt": "a red fox", "n": 1, "size": "64x64"}
    if sends_response_format:
        data["response_format"] = "b64_json"
    response = httpx.post(f"{service.url}/v1/images/generations", json=data, headers=headers, timeout=120)
    response.raise_for_status()
    res = response.json()
    for image in res["data"]:
        assert image.get("url") is None  # b64_json by default, so Open WebUI never has to fetch a URL
        assert png(image["b64_json"]).size == (64, 64)


@pytest.mark.usefixtures("fake_default")
def test_open_webui_fetches_a_url_with_its_own_headers(service: Service) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = {"model": "dall-e-3", "prompt": "a red fox", "n": 1, "size": "64x64", "response_format": "url"}
    res = httpx.post(f"{service.url}/v1/images/generations", json=data, headers=headers, timeout=120).json()
    # get_image_data: the same headers minus Content-Type; the answer must be an image/* type.
    fetched = httpx.get(res["data"][0]["url"], headers={k: v for k, v in headers.items() if k != "Content-Type"})
    assert fetched.status_code == 200 and fetched.headers["content-type"].split("/")[0] == "image"


def test_open_webui_openai_engine_error_is_the_openai_envelope(service: Service) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = {"model": "dall-e-2", "prompt": "a red fox", "n": 1, "size": "13x13", "response_format": "b64_json"}
    response = httpx.post(f"{service.url}/v1/images/generations", json=data, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "size" and response.json()["error"]["message"]


# -- n8n: the legacy OpenAI node (packages/nodes-base/nodes/OpenAi/ImageDescription.ts) --------------


@pytest.mark.usefixtures("fake_default")
def test_n8n_legacy_openai_node(service: Service) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=120) as http:
        # loadOptions: GET /v1/models, rootProperty "data", keep ids starting with "dall-", sort by name.
        models = http.get("/v1/models").json()["data"]
        options = sorted(item["id"] for item in models if item["id"].startswith("dall-"))
        assert options == ["dall-e-2", "dall-e-3"]
        # Create: response format "Binary File" sends b64_json and turns each data[i].b64_json into a file.
        body = {
            "prompt": "A cute cat eating a dinosaur",
            "model": "dall-e-2",
            "response_format": "b64_json",
            "n": 2,
            "size": "256x256",
        }
        response = http.post("/v1/images/generations", json=body)
        assert response.status_code == 200  # sendErrorPostReceive throws on 4xx/5xx
        items = response.json()["data"]
        assert len(items) == 2 and all(png(item["b64_json"]).size == (256, 256) for item in items)
        # "Image Url" sends response_format url and passes data[] through.
        body = {
            "prompt": "A cute cat",
            "model": "dall-e-3",
            "response_format": "url",
            "quality": "standard",
            "style": "vivid",
            "size": "256x256",
        }
        (item,) = http.post("/v1/images/generations", json=body).json()["data"]
        assert item["url"].startswith(f"{service.url}/api/images/")


# -- LibreChat: the Stable Diffusion tool (api/app/clients/tools/structured/StableDiffusion.js) -------


@pytest.mark.usefixtures("fake_default")
def test_librechat_stable_diffusion_tool(service: Service) -> None:
    # The tool posts a fixed payload (1024x1024, 22 steps) and reads images[0] and info (some versions
    # send no credentials at all: then the service runs without SD_API_KEY on a private network).
    payload = {
        "prompt": "photo of a man in black clothes, coastline",
        "negative_prompt": "cgi, 3d, render",
        "cfg_scale": 4.5,
        "steps": 22,
        "width": 1024,
        "height": 1024,
    }
    data = service.http.post("/sdapi/v1/txt2img", json=payload).json()
    image = data["images"][0]
    info = json.loads(data["info"])  # height, width, seed and infotexts[0] go into the file's metadata
    assert (info["width"], info["height"]) == (1024, 1024) and png(image).size == (1024, 1024)
    assert info["infotexts"][0].split("\n").pop().startswith("Steps: 22")
    assert isinstance(info["seed"], int)


# -- SillyTavern: src/endpoints/stable-diffusion.js (the SD WebUI source) ----------------------------


def test_sillytavern_sd_webui_source(service: Service) -> None:
    auth = f"tavern:{KEY}"
    headers = {"Authorization": basic(auth)}
    with httpx.Client(base_url=service.url, headers=headers, timeout=120) as http:
        assert http.get("/sdapi/v1/options").status_code == 200  # /ping
        assert "forge_preset" not in http.get("/sdapi/v1/options").json()  # else it assumes Forge
        upscalers = [x["name"] for x in http.get("/sdapi/v1/upscalers").json()]
        upscalers[1:1] = [x["name"] for x in http.get("/sdapi/v1/latent-upscale-modes").json()]
        assert upscalers == ["None"]
        assert isinstance(http.get("/sdapi/v1/sd-vae").json(), list)
        samplers = [x["name"] for x in http.get("/sdapi/v1/samplers").json()]
        schedulers = [x["name"] for x in http.get("/sdapi/v1/schedulers").json()]
        models = [{"value": x["title"], "text": x["title"]} for x in http.get("/sdapi/v1/sd-models").json()]
        assert "Euler a" in samplers and "karras" in schedulers and models[0]["value"] == "tiny-sd [sd]"
        # /set-model posts only the checkpoint, then polls progress until idle.
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["value"]}).raise_for_status()
        state = http.get("/sdapi/v1/progress").json()
        assert state["progress"] == 0.0 and state["state"]["job_count"] == 0
        # /generate forwards its whole request body, including the url and the auth it was given.
        body = {
            "prompt": "a red fox",
            "negative_prompt": "lowres",
            "sampler_name": "Euler a",
            "scheduler": "Karras",
            "steps": 2,
            "cfg_scale": 7,
            "width": 64,
            "height": 64,
            "restore_faces": False,
            "enable_hr": False,
            "hr_upscaler": "None",
            "hr_scale": 1.0,
            "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "seed": 9,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "override_settings_restore_afterwards": True,
            "clip_skip": 1,
            "url": service.url,
            "auth": auth,
        }
        response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200
    data = response.json()
    assert png(data["images"][0]).size == (64, 64)
    info = json.loads(data["info"])
    # "Euler a" has no Karras variant in diffusers: its own schedule ran, and the answer says so.
    assert info["sampler_name"] == "Euler a" and "scheduler" in info["ignored_parameters"]
    assert "override_settings.CLIP_stop_at_last_layers" in info["ignored_parameters"]
    assert KEY not in response.text  # the forwarded credentials are never echoed
