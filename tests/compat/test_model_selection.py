"""Choosing models from the compatibility dialects: only configured models (SD_MODEL_ID + SD_MODELS
for sd, and the other backends' settings) can be chosen; the sd backend switches between its models,
one loaded at a time; A1111's options change the service's default at runtime, a request's
override_settings only that request."""

from __future__ import annotations

import json

import pytest

from tests.compat.conftest import Service

NOT_ALLOWED = "runwayml/stable-diffusion-v1-5"


def a1111(service: Service, **body: object) -> dict:
    response = service.http.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, **body})
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])


def sd_health(service: Service) -> dict:
    return service.http.get("/health").json()["backends"]["sd"]


def test_lists_offer_the_configured_models_only(service: Service) -> None:
    titles = [model["title"] for model in service.http.get("/sdapi/v1/sd-models").json()]
    assert titles[:2] == ["tiny-sd [sd]", "tiny-sdxl [sd]"]  # the default backend first, SD_MODEL_ID first
    assert "fake-model [fake]" in titles
    assert not any(title.endswith("[flux-api]") for title in titles)  # no BFL key: not offered
    ids = [model["id"] for model in service.http.get("/v1/models").json()["data"]]
    assert NOT_ALLOWED not in ids and NOT_ALLOWED not in json.dumps(titles)


def test_a_model_outside_the_allowlist_is_never_loaded(service: Service) -> None:
    native = service.http.post("/api/txt2img", json={"prompt": "a fox", "model": NOT_ALLOWED, "steps": 1})
    assert native.status_code == 422 and native.json()["error"]["param"] == "model"
    a1111_response = service.http.post(
        "/sdapi/v1/txt2img", json={"prompt": "a fox", "override_settings": {"sd_model_checkpoint": NOT_ALLOWED}}
    )
    assert a1111_response.status_code == 422
    # OpenAI clients send any name; an unknown one means the default model, never a download.
    response = service.http.post(
        "/v1/images/generations", json={"prompt": "a fox", "model": NOT_ALLOWED, "size": "64x64", "steps": 1}
    )
    assert response.status_code == 200
    assert service.http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd [sd]"
    assert sd_health(service)["model"] == "tiny-sd"


def test_switching_sd_models_per_request_and_by_default(service: Service) -> None:
    # override_settings: this request only. The sd backend unloads tiny-sd and loads tiny-sdxl, whose
    # own defaults apply (SDXL: guidance 5.0).
    info = a1111(service, override_settings={"sd_model_checkpoint": "tiny-sdxl [sd]"})
    assert info["sd_model_name"] == "tiny-sdxl" and info["sd_model_checkpoint"] == "tiny-sdxl [sd]"
    assert info["cfg_scale"] == 5.0
    health = sd_health(service)
    assert health["model"] == "tiny-sdxl" and health["loaded"] is True
    assert health["last_unload"]["reason"] == "switching to model tiny-sdxl"
    assert service.http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd [sd]"
    # The OpenAI dialect names a model by its id (or title).
    response = service.http.post(
        "/v1/images/generations", json={"prompt": "a fox", "model": "tiny-sdxl", "size": "64x64", "steps": 1}
    )
    assert response.status_code == 200
    # The A1111 options change the service's default: native requests naming nothing get it too.
    try:
        service.http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl [sd]"}).raise_for_status()
        native = service.http.post("/api/txt2img", json={"prompt": "a fox", "steps": 1}).json()
        assert (native["backend"], native["model"]) == ("sd", "tiny-sdxl")
        assert a1111(service)["sd_model_name"] == "tiny-sdxl"
    finally:
        service.restore_default()
    native = service.http.post("/api/txt2img", json={"prompt": "a fox", "steps": 1}).json()
    assert native["model"] == "tiny-sd" and sd_health(service)["model"] == "tiny-sd"


@pytest.mark.parametrize("name", ["fake", "fake-model", "fake-model [fake]", "FAKE-MODEL [FAKE]"])
def test_checkpoint_names_a1111_clients_use(service: Service, name: str) -> None:
    # A title, a model id, a backend id, and any of them in another case (webuiapi lowercases names).
    assert a1111(service, override_settings={"sd_model_checkpoint": name})["backend"] == "fake"


def test_checkpoint_hash_selects_too(service: Service) -> None:
    models = {model["title"]: model for model in service.http.get("/sdapi/v1/sd-models").json()}
    digest = models["fake-model [fake]"]["hash"]
    assert a1111(service, override_settings={"sd_model_checkpoint": digest})["backend"] == "fake"
