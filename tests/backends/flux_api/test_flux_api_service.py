"""flux-api inside the service: the active-task limit under load, cancel, /health and the key check,
and the key never leaking. All over real HTTP: service -> fake BFL on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.backends.base import Availability, BackendState
from imagegen.backends.bfl.backend import FluxApiBackend
from imagegen.config import Settings
from tests.backends.flux_api.conftest import CANARY_KEY, RunningFake
from tests.backends.flux_api.test_flux_api import image_of, txt2img
from tests.support.fake_bfl import seed_in

Service = Callable[..., httpx.Client]


def backend_of(client: httpx.Client) -> FluxApiBackend:
    backend = client.app.state.services.registry.get("flux-api")  # type: ignore[attr-defined]
    assert isinstance(backend, FluxApiBackend)
    return backend


def concurrently(client: httpx.Client, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body to /api/txt2img at the same time, one connection each."""

    def post(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            return txt2img(own, **body)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, bodies))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- the active-task limit -----------------------------------------------------------------------------


def test_30_concurrent_requests_never_exceed_24_active_tasks(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    # Long enough that all 30 arrive while the first 24 still run, even on a loaded 2-core machine; the
    # fake answers 429 past 24, like BFL.
    bfl = start_fake(generation_time=2.0)
    client = flux_service(bfl)
    assert backend_of(client).concurrency == 24
    responses = concurrently(client, [{"seed": 1000 + index, "width": 256, "height": 256} for index in range(30)])
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        (image,) = response.json()["images"]
        assert image["seed"] == 1000 + index and seed_in(image_of(image)) == 1000 + index  # its own answer
    assert bfl.fake.max_active_seen == 24  # the limit was reached ...
    assert bfl.fake.rejected_busy == 0  # ... and never crossed: BFL never had to say 429
    assert len(bfl.fake.submits) == 30


def test_multi_image_jobs_share_the_limit_inside_the_backend(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    # The engine runs up to 4 jobs at once; 4 jobs of 3 images would be 12 tasks without the backend's slots.
    bfl = start_fake(generation_time=0.15, max_active=4)
    client = flux_service(bfl, bfl_max_active_tasks=4)
    responses = concurrently(
        client, [{"seed": 10 * index, "num_images": 3, "width": 256, "height": 256} for index in range(6)]
    )
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert [image["seed"] for image in response.json()["images"]] == [10 * index + k for k in range(3)]
    assert bfl.fake.max_active_seen == 4 and bfl.fake.rejected_busy == 0
    assert backend_of(client).max_active_seen == 4 and backend_of(client).active_tasks == 0


def test_flux_kontext_max_keeps_to_its_own_limit_of_6(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    # Tasks last long enough for all 6 submits to overlap even when the 10 requests arrive spread out
    # on a busy machine (with 0.2 s the first could end before the sixth was sent: 5 seen).
    bfl = start_fake(generation_time=1.0)
    client = flux_service(bfl)
    responses = concurrently(client, [{"model": "flux-kontext-max", "seed": index} for index in range(10)])
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    assert bfl.fake.rejected_busy == 0 and bfl.fake.max_active_seen == 6


def test_a_cancelled_job_keeps_its_slot_until_bfl_finishes_the_task(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(generation_time=0.8, max_active=1)
    client = flux_service(bfl, bfl_max_active_tasks=1)
    backend = backend_of(client)
    first = client.post("/api/jobs", json={"prompt": "a slow one", "backend": "flux-api", "seed": 1}).json()["id"]
    wait_until(lambda: len(bfl.fake.submits) == 1)
    cancelled = client.delete(f"/api/jobs/{first}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # BFL still runs the task: the service keeps counting it, so the next job waits instead of a 429.
    assert backend.active_tasks == 1
    started = time.monotonic()
    body = txt2img(client, seed=2).json()
    assert body["images"][0]["seed"] == 2
    assert time.monotonic() - started > 0.3
    assert bfl.fake.rejected_busy == 0 and bfl.fake.max_active_seen == 1
    wait_until(lambda: backend.active_tasks == 0)


# -- health ----------------------------------------------------------------------------------------


def test_without_a_key_flux_api_is_not_configured_and_refuses_jobs(
    serve: Service, make_settings: Callable[..., Settings]
) -> None:
    client = serve(make_settings(default_backend="flux-api"), ready=False)
    health = client.get("/health")
    assert health.status_code == 503
    state = health.json()["backends"]["flux-api"]
    assert state["state"] == "not_configured" and "SD_BFL_API_KEY" in state["reason"]
    response = txt2img(client)
    assert response.status_code == 422 and "SD_BFL_API_KEY" in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "backend_not_configured"
    available = backend_of(client).availability()
    assert available == Availability(BackendState.NOT_CONFIGURED, "SD_BFL_API_KEY is not set")
    assert not available.accepts_jobs


def test_health_is_ready_and_the_key_check_is_cached(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    wait_until(lambda: client.get("/health").json()["backends"]["flux-api"]["key_check"] != "unchecked")
    for _ in range(30):
        health = client.get("/health")
        assert health.status_code == 200
    state = health.json()["backends"]["flux-api"]
    assert state["state"] == "ready" and state["key_check"] == "ok" and state["credits"] == 1000
    assert bfl.fake.count("credits") == 1  # 31 health probes, one call to BFL


def test_key_check_refreshes_in_the_background_when_stale(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_key_check_interval=0.2)
    wait_until(lambda: bfl.fake.count("credits") == 1)
    time.sleep(0.3)
    client.get("/health")  # answers from the cache at once, and starts a refresh
    wait_until(lambda: bfl.fake.count("credits") == 2)


def test_a_rejected_key_shows_in_health(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl, bfl_api_key="bfl_wrong-key", ready=False)
    wait_until(lambda: client.get("/health").json()["backends"]["flux-api"]["key_check"] == "rejected")
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["backends"]["flux-api"]["reason"] == "BFL key rejected: check SD_BFL_API_KEY"
    # Jobs are still taken (each answers the rejection, 503): the key may be accepted again (a restored
    # account, trouble on BFL's side), unlike a key that is not set at all.
    available = backend_of(client).availability()
    assert available.state is BackendState.ERROR and available.accepts_jobs


def test_an_empty_account_is_not_ready_until_topped_up(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(credits=0)
    client = flux_service(bfl, ready=False, bfl_key_check_interval=0.2)
    wait_until(lambda: client.get("/health").json()["backends"]["flux-api"]["key_check"] == "no_credits")
    health = client.get("/health")
    assert health.status_code == 503  # flux-api is the default backend: readiness fails
    state = health.json()["backends"]["flux-api"]
    assert state["state"] == "error" and state["reason"].startswith("BFL account out of credits: add credits")
    # Jobs are still taken and answered 402 (what a client of an empty account should hear) ...
    response = txt2img(client)
    assert response.status_code == 402 and response.json()["error"]["type"] == "payment_required"
    # ... and the next key check sees the credits back.
    bfl.fake.credits = 50
    wait_until(lambda: client.get("/health").status_code == 200)
    assert client.get("/health").json()["backends"]["flux-api"]["state"] == "ready"


def test_a_wrong_key_with_an_empty_account_is_still_a_wrong_key(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(credits=0)
    client = flux_service(bfl, bfl_api_key="bfl_wrong-key", ready=False)
    wait_until(lambda: client.get("/health").json()["backends"]["flux-api"]["key_check"] == "rejected")
    state = client.get("/health").json()["backends"]["flux-api"]
    assert state["state"] == "error" and state["reason"] == "BFL key rejected: check SD_BFL_API_KEY"


def test_an_endpoint_without_credits_route_stays_ready(flux_service: Service, bfl: RunningFake) -> None:
    bfl.fake.inject("credits", 404, body={"detail": "Not Found"})
    client = flux_service(bfl)
    wait_until(lambda: client.get("/health").json()["backends"]["flux-api"]["key_check"] == "unsupported")
    assert client.get("/health").status_code == 200


def test_backends_listing_shows_models_and_their_rules(flux_service: Service, bfl: RunningFake) -> None:
    client = flux_service(bfl)
    backends = {item["id"]: item for item in client.get("/api/backends").json()["backends"]}
    flux = backends["flux-api"]
    assert flux["capabilities"]["models"][0] == "flux-2-klein-4b" and flux["capabilities"]["max_batch"] == 1
    assert flux["bfl_models"]["flux-dev"]["size_multiple"] == 32
    assert flux["bfl_models"]["flux-2-klein-4b"]["steps"] is None


# -- the key never leaks -------------------------------------------------------------------------------


@pytest.fixture
def debug_logs() -> Iterator[list[str]]:
    """Every log record of the process at DEBUG, whichever logger (imagegen does not propagate)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))
            if record.exc_info:
                lines.append(logging.Formatter().formatException(record.exc_info))

    handler = Collect(level=logging.DEBUG)
    names = ("", "imagegen", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access")
    previous = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(handler)
    yield lines
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(previous[name])


def _files_under(*roots: Path) -> list[Path]:
    return [path for root in roots if root.exists() for path in root.rglob("*") if path.is_file()]


def test_the_key_appears_in_no_log_response_or_stored_file(
    flux_service: Service,
    start_fake: Callable[..., RunningFake],
    debug_logs: list[str],
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    good = start_fake()
    refusing = start_fake(api_key="bfl_some-other-key")  # answers 401 to the canary key
    client = flux_service(good, log_level="debug")
    other = flux_service(
        refusing, ready=False, log_level="debug", output_dir=tmp_path / "other-out", data_dir=tmp_path / "other-data"
    )
    for name in ("", "imagegen", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.DEBUG)  # the app quietens httpx; here we want it all

    responses = [txt2img(client, seed=11)]  # success
    good.fake.inject("poll", 500, body={"detail": CANARY_KEY})
    good.fake.inject("submit", 422, body={"detail": f"echoing your key {CANARY_KEY} back"})
    responses += [
        txt2img(client, seed=12),  # 422 whose detail echoes the key
        txt2img(client, prompt="moderate-input"),
        txt2img(client, prompt="fail-task"),
        txt2img(client, prompt="corrupt-result"),
        txt2img(other, seed=13),  # 401
        client.post("/api/jobs", json={"prompt": "a job", "backend": "flux-api"}),
        client.get("/health"),
        other.get("/health"),
        client.get("/api/backends"),
        client.get("/info"),
        client.get("/api/jobs"),
        client.get("/openapi.json"),
    ]
    assert responses[0].status_code == 200 and responses[5].status_code == 503
    assert "[redacted]" in responses[1].json()["error"]["message"]
    wait_until(
        lambda: all(job["status"] not in ("queued", "running") for job in client.get("/api/jobs").json()["jobs"])
    )
    responses.append(client.get("/api/jobs"))

    for response in responses:
        assert CANARY_KEY not in response.text, response.request.url
    captured = capfd.readouterr()
    assert CANARY_KEY not in captured.out and CANARY_KEY not in captured.err
    assert debug_logs and not [line for line in debug_logs if CANARY_KEY in line]
    app_settings = [c.app.state.services.settings for c in (client, other)]  # type: ignore[attr-defined]
    files = _files_under(*[s.output_dir for s in app_settings], *[s.data_dir for s in app_settings])
    assert any(path.suffix == ".png" for path in files)
    for path in files:
        assert CANARY_KEY.encode() not in path.read_bytes(), path


def test_bfl_errors_are_counted_by_kind_in_metrics(flux_service: Service, bfl: RunningFake) -> None:
    from tests.support.scrape import delta, scrape

    client = flux_service(bfl, default_backend="flux-api")
    before = scrape(client)
    bfl.fake.inject("submit", 402, body={"detail": "Insufficient credits"})
    assert client.post("/api/txt2img", json={"prompt": "no credits"}).status_code == 402
    bfl.fake.inject("submit", 401, body={"detail": "Invalid key"})
    assert client.post("/api/txt2img", json={"prompt": "bad key"}).status_code == 503
    bfl.fake.inject("submit", 422, body={"detail": [{"msg": "width too large"}]})
    assert client.post("/api/txt2img", json={"prompt": "rejected"}).status_code == 422
    assert client.post("/api/txt2img", json={"prompt": "fine"}).status_code == 200
    after = scrape(client)
    assert delta(before, after, "imagegen_bfl_errors_total", kind="credits") == 1
    assert delta(before, after, "imagegen_bfl_errors_total", kind="auth") == 1
    assert delta(before, after, "imagegen_bfl_errors_total", kind="invalid_request") == 1
    assert delta(before, after, "imagegen_jobs_total", backend="flux-api", status="succeeded") == 1
