"""Errors speak the caller's dialect: the OpenAI envelope under /v1/, A1111's shape under /sdapi/,
the native envelope elsewhere, including the answers given before routing (401, 413, 415) and the
engine's own (429 queue full, job failures). Bad input is a 4xx, never a 500."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.compat.conftest import KEY, Service, start_service

OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"
NATIVE = "/api/txt2img"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Service]:
    # The fake backend as the default (nothing to load), a queue of one, and a small body limit.
    yield from start_service(
        tmp_path_factory.mktemp("errors"), model_dir, default_backend="fake", max_queue=1, max_body_bytes=2048
    )


def is_openai(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def is_a1111(response: httpx.Response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["detail"] and body["errors"] == body["detail"]
    if error_type is not None:
        assert body["error"] == error_type
    return body


def test_401_in_each_dialect(service: Service) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = is_openai(
            httpx.post(service.url + OPENAI, json={"prompt": "x"}, headers=headers), 401, "invalid_api_key"
        )
        assert error["type"] == "invalid_request_error"
        response = httpx.get(service.url + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        response = httpx.get(service.url + "/sdapi/v1/options", headers=headers)
        is_a1111(response, 401, "authentication_error")
        assert response.headers["www-authenticate"].startswith("Basic")
        native = httpx.post(service.url + NATIVE, json={"prompt": "x"}, headers=headers)
        assert native.status_code == 401 and native.json()["error"]["type"] == "authentication_error"
        assert KEY not in response.text + native.text


def test_body_guard_answers_in_each_dialect(service: Service) -> None:
    http = service.http
    is_openai(
        http.post(OPENAI, content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "unsupported_media_type",
    )
    is_a1111(http.post(A1111, content=b"prompt=x", headers={"Content-Type": "text/plain"}), 415)
    big = {"prompt": "x" * 4096}
    is_openai(http.post(OPENAI, json=big), 413, "payload_too_large")
    is_a1111(http.post(A1111, json=big), 413, "payload_too_large")
    is_openai(
        http.post(OPENAI, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"
    )
    is_a1111(http.post(A1111, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json")
    is_openai(http.get("/v1/no-such-route"), 404)
    is_a1111(http.get("/sdapi/v1/no-such-route"), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "n": "two"}, "n"),
        ({"prompt": "x", "n": 9}, "n"),
        ({"prompt": "x", "size": "0x64"}, "size"),
        ({"prompt": "x", "size": "99999x99999"}, "size"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ([1, 2], None),
    ],
)
def test_openai_bad_input_is_400_naming_the_parameter(service: Service, body: object, param: str | None) -> None:
    assert is_openai(service.http.post(OPENAI, json=body), 400)["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "batch_size": 5, "n_iter": 5}, "batch_size"),
        ({"prompt": "x", "width": 60}, "width"),
        ({"prompt": "x", "cfg_scale": 50}, "cfg_scale"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "scheduler": "bogus"}, "scheduler"),
        ({"prompt": "x", "override_settings": "x"}, "override_settings"),
        (
            {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope.safetensors [abc]"}},
            "override_settings.sd_model_checkpoint",
        ),
        ({"prompt": "x", "override_settings": {"sd_model_checkpoint": 7}}, "override_settings.sd_model_checkpoint"),
    ],
)
def test_a1111_bad_input_is_422_naming_the_parameter(service: Service, body: dict, param: str) -> None:
    assert is_a1111(service.http.post(A1111, json=body), 422)["param"] == param


def test_options_post_errors(service: Service) -> None:
    http = service.http
    assert (
        is_a1111(http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}), 422)["param"]
        == "sd_model_checkpoint"
    )
    # A known checkpoint whose backend cannot take jobs (no BFL key here) is refused with the reason.
    body = is_a1111(
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "flux-api"}), 422, "backend_not_configured"
    )
    assert "not_configured" in body["detail"]
    is_a1111(http.post("/sdapi/v1/options", json=["not", "a", "dict"]), 400)
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "fake-model [fake]"


def wait_running(service: Service, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while service.http.get(f"/api/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_queue_full_is_429_in_each_dialect(service: Service) -> None:
    http = service.http
    blocker = http.post("/api/jobs", json={"prompt": "hang"}).json()
    wait_running(service, blocker["id"])
    queued = http.post("/api/jobs", json={"prompt": "waits"}).json()  # the queue (of one) is now full
    try:
        response = http.post(OPENAI, json={"prompt": "one more"})
        is_openai(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        with openai.OpenAI(api_key=KEY, base_url=f"{service.url}/v1", max_retries=0) as sdk:
            with pytest.raises(openai.RateLimitError):
                sdk.images.generate(prompt="one more")
        response = http.post(A1111, json={"prompt": "one more"})
        is_a1111(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
    finally:
        http.post(f"/api/jobs/{queued['id']}/cancel")
        http.post(f"/api/jobs/{blocker['id']}/cancel")
        service.fake.release()


@pytest.mark.parametrize(
    ("prompt", "openai_status", "openai_code", "a1111_status", "a1111_type"),
    [
        ("fail", 500, "generation_failed", 500, "generation_failed"),
        ("oom", 503, "out_of_memory", 503, "out_of_memory"),
        ("nsfw", 400, "content_policy_violation", 422, "content_moderated"),
    ],
)
def test_job_failures_in_each_dialect(
    service: Service, prompt: str, openai_status: int, openai_code: str, a1111_status: int, a1111_type: str
) -> None:
    error = is_openai(service.http.post(OPENAI, json={"prompt": prompt}), openai_status, openai_code)
    assert error["type"] == ("server_error" if openai_status >= 500 else "invalid_request_error")
    is_a1111(service.http.post(A1111, json={"prompt": prompt}), a1111_status, a1111_type)


# -- a backend that is not configured (no SD_BFL_API_KEY here) -----------------------------------


def counting_sdk(service: Service) -> tuple[openai.OpenAI, list[str]]:
    """The real openai SDK with its default retry policy, counting every HTTP request it sends: a retry
    is a second request."""
    sent: list[str] = []
    http_client = httpx.Client(timeout=120, event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    return openai.OpenAI(api_key=KEY, base_url=f"{service.url}/v1", http_client=http_client), sent


def test_an_unconfigured_backend_is_model_not_found_and_the_openai_sdk_does_not_retry(service: Service) -> None:
    sdk, sent = counting_sdk(service)
    assert sdk.max_retries == 2  # the SDK's default: it retries 5xx twice
    with sdk, pytest.raises(openai.NotFoundError) as raised:
        sdk.images.generate(prompt="a fox", model="flux-api")
    assert sent == [OPENAI]  # one request: a 404 is final
    error = raised.value.body
    assert isinstance(error, dict)
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "SD_BFL_API_KEY is not set" in error["message"]
    # The same model by its model id or checkpoint title.
    for name in ("flux-2-klein-4b", "flux-2-klein-4b [flux-api]"):
        is_openai(service.http.post(OPENAI, json={"prompt": "x", "model": name}), 404, "model_not_found")


def test_the_counting_sdk_does_see_retries_of_a_503(service: Service) -> None:
    """The control of the test above: the same client, answered a 503 (out of memory), retries."""
    sdk, sent = counting_sdk(service)
    with sdk, pytest.raises(openai.InternalServerError):
        sdk.images.generate(prompt="oom", model="fake")
    assert sent == [OPENAI] * 3


def test_an_unconfigured_backend_is_422_in_the_native_and_a1111_dialects(service: Service) -> None:
    http = service.http
    for path in (NATIVE, "/api/jobs"):
        response = http.post(path, json={"prompt": "x", "backend": "flux-api"})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "backend_not_configured" and error["param"] == "backend"
        assert "SD_BFL_API_KEY is not set" in error["message"]
    body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "flux-2-klein-4b [flux-api]"}}
    error = is_a1111(http.post(A1111, json=body), 422, "backend_not_configured")
    assert error["param"] == "override_settings.sd_model_checkpoint" and "SD_BFL_API_KEY" in error["detail"]
    assert service.http.get("/api/jobs", params={"backend": "flux-api"}).json()["jobs"] == []  # none was queued
