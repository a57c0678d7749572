"""flux-api end to end: the service's HTTP API -> job engine -> BFL backend -> a fake BFL server over
real HTTP on loopback -> stored outputs. Each test names the behaviour of the issue it covers."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from typing import Any

import httpx
from PIL import Image

from imagegen.storage.metadata import read_metadata
from tests.backends.flux_api.conftest import RunningFake
from tests.support.fake_bfl import seed_in

Service = Callable[..., httpx.Client]


def txt2img(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/api/txt2img", json={"prompt": "a lighthouse at dawn", "backend": "flux-api", **body})


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    return error["message"]


def image_of(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64"])))


# -- success ------------------------------------------------------------------------------------------


def test_success_echoes_the_seed_and_stores_bfl_task_id_and_seed(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    body = ok(txt2img(client, seed=1234, width=512, height=384))
    assert body["backend"] == "flux-api" and body["model"] == "flux-2-klein-4b"
    (image,) = body["images"]
    assert image["seed"] == 1234 and image["bfl_seed"] == 1234
    task_id = image["bfl_task_id"]
    assert task_id == bfl.fake.submits[0]["id"]
    pixels = image_of(image)
    assert pixels.size == (512, 384) and seed_in(pixels) == 1234

    # What BFL received: klein's fields only, with the safe default tolerance.
    sent = bfl.fake.submits[0]["body"]
    assert bfl.fake.submits[0]["model"] == "flux-2-klein-4b"
    assert sent == {
        "prompt": "a lighthouse at dawn",
        "seed": 1234,
        "width": 512,
        "height": 384,
        "safety_tolerance": 2,
        "output_format": "png",
    }

    # The stored file carries BFL's task id and seed in its metadata.
    served = client.get(f"/api/images/{image['filename']}")
    meta = read_metadata(io.BytesIO(served.content))["imagegen"]
    assert meta["bfl_task_id"] == task_id and meta["bfl_seed"] == 1234 and meta["seed"] == 1234
    assert meta["backend"] == "flux-api" and meta["model"] == "flux-2-klein-4b"


def test_key_goes_to_the_api_only_and_the_download_carries_none(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    ok(txt2img(client, seed=1))
    for route in ("submit", "poll"):
        assert all(headers.get("x-key") == bfl.fake.api_key for headers in bfl.fake.seen_headers(route))
    downloads = bfl.fake.seen_headers("sample")
    assert len(downloads) == 1 and "x-key" not in downloads[0]


def test_several_images_run_as_concurrent_tasks_with_consecutive_seeds(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(generation_time=0.3)
    client = flux_service(bfl)
    started = time.monotonic()
    body = ok(txt2img(client, seed=40, num_images=3, width=256, height=256))
    elapsed = time.monotonic() - started
    assert [image["seed"] for image in body["images"]] == [40, 41, 42]
    assert [seed_in(image_of(image)) for image in body["images"]] == [40, 41, 42]
    assert len({image["bfl_task_id"] for image in body["images"]}) == 3
    assert bfl.fake.max_active_seen == 3
    assert elapsed < 0.9  # concurrent, not 3 x 0.3 s one after another


def test_per_request_safety_tolerance_output_format_and_model(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    body = ok(
        txt2img(
            client,
            seed=5,
            model="flux-dev",
            width=512,
            height=512,
            steps=20,
            guidance_scale=3.5,
            safety_tolerance=6,
            output_format="jpeg",
        )
    )
    assert body["model"] == "flux-dev" and body["images"][0]["mime_type"] == "image/jpeg"
    sent = bfl.fake.submits[0]
    assert sent["model"] == "flux-dev"
    assert sent["body"]["steps"] == 20 and sent["body"]["guidance"] == 3.5
    assert sent["body"]["safety_tolerance"] == 6 and sent["body"]["output_format"] == "jpeg"


def test_aspect_ratio_models_send_the_ratio_and_keep_the_size_bfl_returns(
    flux_service: Service, bfl: RunningFake
) -> None:
    client = flux_service(bfl)
    body = ok(txt2img(client, seed=9, model="flux-pro-1.1-ultra", width=1344, height=768))
    assert bfl.fake.submits[0]["body"]["aspect_ratio"] == "7:4"
    assert "width" not in bfl.fake.submits[0]["body"]
    image = body["images"][0]
    assert image_of(image).size == (image["width"], image["height"])


def test_job_api_runs_a_flux_api_job_and_reports_progress(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(generation_time=0.5)
    client = flux_service(bfl, bfl_poll_interval=0.05, bfl_poll_max_interval=0.05)
    accepted = client.post("/api/jobs", json={"prompt": "a harbour", "backend": "flux-api", "seed": 77})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    fractions = []
    deadline = time.monotonic() + 10
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        fractions.append(job["progress"]["fraction"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    image = job["result"]["images"][0]
    assert image["seed"] == 77 and image["bfl_task_id"] == bfl.fake.submits[0]["id"]
    assert any(0 < fraction < 1 for fraction in fractions), fractions  # BFL's progress reached the job


# -- statuses -> errors -------------------------------------------------------------------------------


def test_request_moderated_is_422_content_moderated_at_input(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    message = error_of(txt2img(client, prompt="please moderate-input this"), 422, "content_moderated")
    assert "stage: input" in message


def test_content_moderated_is_422_content_moderated_at_output(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    message = error_of(txt2img(client, prompt="please moderate-output this"), 422, "content_moderated")
    assert "stage: output" in message
    assert bfl.fake.count("sample") == 0


def test_error_status_is_502_with_the_reason(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    message = error_of(txt2img(client, prompt="fail-task"), 502, "upstream_error")
    assert "fake generation failure" in message


def test_task_not_found_is_502(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    message = error_of(txt2img(client, prompt="lose-task"), 502, "upstream_error")
    assert "Task not found" in message


# -- HTTP errors -> errors ----------------------------------------------------------------------------


def test_rejected_key_is_503_saying_which_setting(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_api_key="bfl_wrong-key", bfl_key_check=False)
    message = error_of(txt2img(client), 503, "backend_unavailable")
    assert message == "BFL key rejected: check SD_BFL_API_KEY"


def test_403_is_the_same_key_error(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    bfl.fake.inject("submit", 403, body={"detail": "Forbidden"})
    assert error_of(txt2img(client), 503, "backend_unavailable") == "BFL key rejected: check SD_BFL_API_KEY"


def test_out_of_credits_is_402(flux_service: Service, bfl: RunningFake) -> None:
    bfl.fake.credits = 0
    client = flux_service(bfl, ready=False)  # an empty account is not ready (test_flux_api_service.py)
    assert error_of(txt2img(client), 402, "payment_required") == "BFL account out of credits"


def test_bfl_validation_error_is_422_with_bfl_detail_and_no_input_echo(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    bfl.fake.inject(
        "submit",
        422,
        body={
            "detail": [
                {
                    "type": "value_error",
                    "loc": ["body", "prompt"],
                    "msg": "prompt is too long",
                    "input": "SECRET-INPUT",
                },
            ]
        },
    )
    message = error_of(txt2img(client), 422, "invalid_parameter")
    assert "prompt: prompt is too long" in message and "SECRET-INPUT" not in message


def test_transient_errors_are_retried_then_succeed(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    bfl.fake.inject("submit", 429, times=2)
    bfl.fake.inject("poll", 500)
    bfl.fake.inject("poll", 503)
    bfl.fake.inject("sample", 503)
    body = ok(txt2img(client, seed=3))
    assert body["images"][0]["seed"] == 3
    assert bfl.fake.count("submit") == 3 and len(bfl.fake.submits) == 1  # one task, two refusals


def test_retry_after_is_honoured(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    bfl.fake.inject("submit", 429, headers={"Retry-After": "1"})
    ok(txt2img(client, seed=3))
    first, second = [item["time"] for item in bfl.fake.requests if item["route"] == "submit"]
    assert second - first >= 1.0


def test_retries_exhausted_is_503(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_max_retries=2)
    bfl.fake.inject("submit", 503, times=3)
    message = error_of(txt2img(client), 503, "backend_unavailable")
    assert "HTTP 503" in message and "3 attempt(s)" in message
    assert bfl.fake.count("submit") == 3 and not bfl.fake.submits


def test_busy_bfl_429_exhausted_is_503(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_max_retries=1)
    bfl.fake.inject("submit", 429, times=2)
    assert "429" in error_of(txt2img(client), 503, "backend_unavailable")


def test_deadline_is_504(flux_service: Service, start_fake: Callable[..., RunningFake]) -> None:
    bfl = start_fake(generation_time=5.0)
    client = flux_service(bfl, bfl_timeout=0.3)
    started = time.monotonic()
    message = error_of(txt2img(client), 504, "deadline_exceeded")
    assert "SD_BFL_TIMEOUT" in message
    assert time.monotonic() - started < 3


def test_job_timeout_is_504_too(flux_service: Service, start_fake: Callable[..., RunningFake]) -> None:
    bfl = start_fake(generation_time=5.0)
    client = flux_service(bfl, job_timeout=0.3)
    message = error_of(txt2img(client), 504, "deadline_exceeded")
    assert "SD_JOB_TIMEOUT" in message


def test_polling_url_on_a_foreign_host_is_refused(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    elsewhere = start_fake()  # a listening server: any request reaching it would be recorded
    bfl = start_fake(polling_base=elsewhere.url)
    client = flux_service(bfl)
    message = error_of(txt2img(client), 502, "upstream_error")
    assert "polling_url" in message and "not a BFL API host" in message
    assert elsewhere.fake.requests == []  # the key never went there


def test_expired_result_url_is_502(flux_service: Service, start_fake: Callable[..., RunningFake]) -> None:
    bfl = start_fake(result_ttl=0.0)
    client = flux_service(bfl)
    message = error_of(txt2img(client), 502, "upstream_error")
    assert "expired" in message


def test_oversize_download_is_refused_by_content_length(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(result_padding=200_000)
    client = flux_service(bfl, bfl_max_download_bytes=100_000)
    assert "SD_BFL_MAX_DOWNLOAD_BYTES" in error_of(txt2img(client), 502, "upstream_error")


def test_oversize_download_is_refused_while_streaming(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(result_padding=200_000, chunked_results=True)
    client = flux_service(bfl, bfl_max_download_bytes=100_000)
    assert "SD_BFL_MAX_DOWNLOAD_BYTES" in error_of(txt2img(client), 502, "upstream_error")


def test_a_result_that_is_not_an_image_is_502(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    assert "not a valid PNG, JPEG or WebP image" in error_of(
        txt2img(client, prompt="corrupt-result"), 502, "upstream_error"
    )


# -- transport failures: every one a 502 upstream_error, never a 500 with a traceback -------------------


def _service_log(client: httpx.Client) -> io.StringIO:
    """The service's log handler (installed by create_app) pointed at a buffer."""
    import logging

    buffer = io.StringIO()
    from imagegen.logging_setup import ServiceLogHandler

    (handler,) = [h for h in logging.getLogger("imagegen").handlers if isinstance(h, ServiceLogHandler)]
    handler.setStream(buffer)
    return buffer


def test_a_result_url_that_redirects_in_a_loop_is_502(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, log_level="info")
    log = _service_log(client)
    message = error_of(txt2img(client, prompt="redirect-loop"), 502, "upstream_error")
    assert "too many redirects" in message
    assert 2 <= bfl.fake.count("sample") <= 4  # the download client follows three redirects, then stops
    assert "Traceback" not in log.getvalue() and "unexpected" not in log.getvalue()


def test_a_result_whose_body_does_not_decode_is_502(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    # Declared gzip, sent plain: httpx fails while decoding the stream.
    bfl.fake.inject("sample", 200, body={"not": "gzip"}, headers={"Content-Encoding": "gzip"})
    assert "DecodingError" in error_of(txt2img(client), 502, "upstream_error")


def test_a_tls_failure_is_502_and_not_retried(flux_service: Service, start_fake: Callable[..., RunningFake]) -> None:
    # The result URL says https, the server behind it speaks plain HTTP: the handshake fails.
    bfl = start_fake()
    bfl.fake.delivery_base = bfl.url.replace("http://", "https://")
    client = flux_service(bfl)
    assert "TLS error" in error_of(txt2img(client), 502, "upstream_error")
    assert bfl.fake.count("sample") == 0


class GarbageServer:
    """Answers every connection with bytes that are not HTTP, then closes it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                connection.recv(65536)
                connection.sendall(b"this is not HTTP\r\n\r\n")

    def close(self) -> None:
        self.listener.close()


def test_a_protocol_error_is_502_after_the_retries(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    garbage = GarbageServer()
    try:
        bfl = start_fake(delivery_base=garbage.url)
        client = flux_service(bfl, bfl_max_retries=2)
        message = error_of(txt2img(client), 502, "upstream_error")
        assert "RemoteProtocolError" in message and "3 attempt(s)" in message
        assert garbage.connections == 3  # a download is idempotent: retried
    finally:
        garbage.close()


# -- validation before any credit is spent -------------------------------------------------------------


def test_per_model_rules_are_422_before_reaching_bfl(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    cases = [
        ({"width": 1000}, "width"),  # FLUX.2: multiple of 16
        ({"model": "flux-dev", "width": 1008}, "width"),  # FLUX.1: multiple of 32
        ({"model": "flux-pro-1.1", "width": 1536}, "width"),  # FLUX.1: at most 1440
        ({"safety_tolerance": 6}, "safety_tolerance"),  # FLUX.2: at most 5
        ({"model": "flux-dev", "steps": 60}, "steps"),
        ({"model": "flux-dev", "guidance_scale": 9}, "guidance_scale"),
        ({"model": "flux-kontext-pro", "width": 2048, "height": 256}, "width"),  # ratio beyond 21:9
        ({"model": "flux-not-a-model"}, "model"),
    ]
    for extra, param in cases:
        response = txt2img(client, **extra)
        assert response.status_code == 422, (extra, response.text)
        assert response.json()["error"]["param"] == param, (extra, response.text)
    assert bfl.fake.requests == [] or all(item["route"] == "credits" for item in bfl.fake.requests)


def test_fields_a_model_does_not_take_are_reported_ignored(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    body = ok(txt2img(client, steps=30, guidance_scale=4.0, negative_prompt="blur"))
    assert set(body["ignored_parameters"]) == {"steps", "guidance_scale", "negative_prompt"}
    assert "steps" not in bfl.fake.submits[0]["body"] and "guidance" not in bfl.fake.submits[0]["body"]


def test_models_can_be_restricted(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_models="flux-2-klein-4b,flux-dev")
    backends = {item["id"]: item for item in client.get("/api/backends").json()["backends"]}
    assert backends["flux-api"]["capabilities"]["models"] == ["flux-2-klein-4b", "flux-dev"]
    assert txt2img(client, model="flux-2-max").json()["error"]["param"] == "model"
