"""flux-api protocol details, on the backend directly (still real HTTP against the fake BFL server)."""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import get_args

import httpx
import pytest
from PIL import Image

from imagegen.backends.base import RunContext
from imagegen.backends.bfl.backend import FluxApiBackend, check_result
from imagegen.backends.bfl.client import is_bfl_api_url, parse_progress, retry_after_seconds
from imagegen.backends.bfl.models import FILL, FILL_MODEL, MODELS
from imagegen.config import BflModel, Settings, SettingsError, load_settings
from imagegen.errors import JobCancelledError, ServiceError, UpstreamError
from imagegen.generation import GenerationParams
from imagegen.storage import png_writer
from tests.backends.flux_api.conftest import CANARY_KEY, RunningFake
from tests.support.fake_bfl import DEFAULT_KEY, MODEL_RULES
from tests.support.process import FAKE_BFL, ServiceProcess


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.bfl.ai/v1/get_result?id=1", True),
        ("https://api.eu.bfl.ai/v1/get_result?id=1", True),
        ("https://api.us1.bfl.ai/v1/get_result?id=1", True),
        ("https://api.bfl.ai:443/v1/get_result?id=1", True),
        ("http://api.bfl.ai/v1/get_result?id=1", False),  # no downgrade to plain http
        ("https://api.bfl.ai:8443/v1/get_result", False),
        ("https://delivery-eu1.bfl.ai/results/x", False),  # a delivery host never gets the key
        ("https://api.bfl.ai.evil.example/v1/get_result", False),
        ("https://evilapi.bfl.ai.example/v1", False),
        ("https://user:pass@api.bfl.ai/v1/get_result", False),
        ("https://bfl.ai/v1/get_result", False),
        ("not a url", False),
    ],
)
def test_polling_url_must_be_a_bfl_api_host(url: str, expected: bool) -> None:
    assert is_bfl_api_url(url, "https://api.bfl.ai") is expected


def test_the_configured_origin_is_a_bfl_api_host_too() -> None:
    assert is_bfl_api_url("http://127.0.0.1:8787/v1/get_result?id=1", "http://127.0.0.1:8787")
    assert not is_bfl_api_url("http://127.0.0.1:8788/v1/get_result?id=1", "http://127.0.0.1:8787")
    assert not is_bfl_api_url("https://127.0.0.1:8787/v1/get_result?id=1", "http://127.0.0.1:8787")


def test_retry_after_takes_seconds_or_a_date() -> None:
    assert retry_after_seconds("3") == 3.0
    in_ten = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8 <= (retry_after_seconds(in_ten) or 0) <= 10
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_progress_is_a_fraction_or_a_percentage() -> None:
    assert parse_progress(0.25) == 0.25 and parse_progress(40) == 0.4
    assert parse_progress(None) is None and parse_progress("half") is None and parse_progress(True) is None


def test_the_model_table_the_settings_and_the_fake_agree() -> None:
    # The fake also answers the fill endpoint, which is no selectable model (a mask goes there).
    assert set(MODELS) == set(get_args(BflModel)) == set(MODEL_RULES) - {FILL_MODEL}
    for name, rules in (*MODELS.items(), (FILL_MODEL, FILL)):
        fake = MODEL_RULES[name]
        assert (rules.size_multiple, rules.max_safety_tolerance) == (fake["multiple"], fake["safety"]), name
        assert (rules.steps is None) == (fake["steps"] is None), name
        assert rules.max_references == fake.get("references", 0), name


def test_check_refuses_what_is_not_a_png_jpeg_or_webp() -> None:
    with pytest.raises(UpstreamError):
        check_result(b"GIF89a not really")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    with pytest.raises(UpstreamError):
        check_result(buffer.getvalue())
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    checked = check_result(buffer.getvalue())
    assert checked.image is None and checked.encoded is not None  # kept as delivered, not decoded
    assert (checked.encoded.format, checked.encoded.width, checked.encoded.height) == ("png", 8, 8)
    assert checked.encoded.data == buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_check_refuses_a_truncated_or_damaged_result_without_decoding_it(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buffer, format=fmt)
    data = buffer.getvalue()
    with pytest.raises(UpstreamError, match="not a valid PNG, JPEG or WebP"):
        check_result(data[: len(data) // 2])  # a download cut short
    if fmt == "PNG":
        damaged = bytearray(data)
        damaged[len(data) // 2] ^= 0xFF  # one flipped byte inside IDAT: its CRC no longer matches
        with pytest.raises(UpstreamError, match="not a valid PNG, JPEG or WebP"):
            check_result(bytes(damaged))
    assert check_result(data + b"\0" * 16).encoded is not None  # padding after the end marker is harmless


def test_check_refuses_an_image_far_larger_than_any_answer() -> None:
    header = b"\x89PNG\r\n\x1a\n" + png_writer.chunk(b"IHDR", struct.pack(">IIBBBBB", 5000, 5000, 8, 2, 0, 0, 0))
    with pytest.raises(UpstreamError, match="far larger"):
        check_result(header + png_writer.chunk(b"IEND", b""))


# -- the backend against the fake ---------------------------------------------------------------------


async def run(backend: FluxApiBackend, ctx: RunContext, **params: object) -> list:
    request = backend.resolve(GenerationParams(prompt=str(params.pop("prompt", "a fox")), **params))  # type: ignore[arg-type]
    return await backend.generate([request], ctx)


def context(seconds: float = 30.0) -> RunContext:
    return RunContext(["job"], deadline=time.monotonic() + seconds)


async def test_a_submit_whose_answer_is_lost_is_not_retried(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    bfl = start_fake(submit_delay=1.0)
    backend = FluxApiBackend(bfl_settings(bfl, bfl_request_timeout=0.2))
    try:
        with pytest.raises(UpstreamError, match="not retried"):
            await run(backend, context(), seed=1)
    finally:
        await backend.close()
    assert bfl.fake.count("submit") == 1  # a second submit could have started (and billed) a second task


@pytest.mark.parametrize("report_progress", [True, False])
async def test_polling_aims_at_the_estimated_finish_when_bfl_reports_progress(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings], report_progress: bool
) -> None:
    bfl = start_fake(generation_time=1.0, report_progress=report_progress)
    # Production-like pauses: 0.3 s, growing x1.5 to 2 s.
    backend = FluxApiBackend(bfl_settings(bfl, bfl_poll_interval=0.3, bfl_poll_max_interval=2.0))
    steps: list[int] = []
    ctx = RunContext(["job"], deadline=time.monotonic() + 30, on_progress=lambda step, total: steps.append(step))
    try:
        await run(backend, ctx, seed=1, width=256, height=256)
    finally:
        await backend.close()
    submitted = next(item["time"] for item in bfl.fake.requests if item["route"] == "submit")
    fetched = next(item["time"] for item in bfl.fake.requests if item["route"] == "sample")
    late = fetched - submitted - 1.0
    if report_progress:
        assert late < 0.15, late  # picked up right after it was ready
        assert any(0 < step < 100 for step in steps) and steps[-1] == 100
    else:
        assert 0.3 < late < 0.6, late  # the backoff schedule alone polls at 0.3, 0.75, 1.43 s


async def test_cancel_stops_polling_and_spends_nothing_more(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    bfl = start_fake(generation_time=0.6)
    backend = FluxApiBackend(bfl_settings(bfl))
    ctx = context()
    task = asyncio.ensure_future(run(backend, ctx, seed=1))
    while not bfl.fake.submits:
        await asyncio.sleep(0.01)
    ctx.cancel_all()
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(task, timeout=2)
    assert backend.active_tasks == 1  # still running at BFL: still counted
    while backend.active_tasks:
        await asyncio.sleep(0.02)
    await backend.close()
    assert bfl.fake.count("sample") == 0 and len(bfl.fake.submits) == 1


async def test_a_job_cancelled_while_waiting_for_a_slot_never_submits(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    bfl = start_fake(generation_time=0.5)
    backend = FluxApiBackend(bfl_settings(bfl, bfl_max_active_tasks=1))
    busy = asyncio.ensure_future(run(backend, context(), seed=1))
    while not bfl.fake.submits:
        await asyncio.sleep(0.01)
    waiting_ctx = context()
    waiting = asyncio.ensure_future(run(backend, waiting_ctx, seed=2))
    await asyncio.sleep(0.05)
    waiting_ctx.cancel_all()
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(waiting, timeout=2)
    await busy
    await backend.close()
    assert len(bfl.fake.submits) == 1


async def test_health_never_waits_for_bfl(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    bfl = start_fake()
    backend = FluxApiBackend(bfl_settings(bfl))
    await backend.start()
    started = time.perf_counter()
    for _ in range(100):
        backend.health()
    assert time.perf_counter() - started < 0.1  # cache reads, no network
    while backend.health().details["key_check"] == "unchecked":
        await asyncio.sleep(0.01)
    assert backend.health().details["credits"] == 1000 and bfl.fake.count("credits") == 1
    await backend.close()


async def test_errors_are_service_errors_with_their_http_meaning(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    bfl = start_fake()
    backend = FluxApiBackend(bfl_settings(bfl))
    cases = {"submit": [(402, 402), (401, 503), (403, 503), (400, 422), (404, 502)], "poll": [(401, 503), (418, 502)]}
    try:
        for route, pairs in cases.items():
            for upstream, ours in pairs:
                bfl.fake.inject(route, upstream)
                with pytest.raises(ServiceError) as raised:
                    await run(backend, context(), seed=1)
                assert raised.value.status_code == ours, (route, upstream, raised.value.message)
    finally:
        await backend.close()


# -- the fake as a developer runs it ------------------------------------------------------------------


def test_the_fake_runs_as_a_module_on_loopback(tmp_path: Path) -> None:
    fake = ServiceProcess(
        tmp_path, command=(*FAKE_BFL, "--generation-time", "0.1"), health="/v1/credits", headers={"x-key": DEFAULT_KEY}
    )
    with fake:
        port = fake.port
        response = httpx.get(f"http://127.0.0.1:{port}/v1/credits", headers={"x-key": DEFAULT_KEY})
        assert response.status_code == 200 and response.json()["credits"] > 0
        submitted = httpx.post(
            f"http://127.0.0.1:{port}/v1/flux-2-klein-4b",
            headers={"x-key": DEFAULT_KEY},
            json={"prompt": "a fox", "seed": 3},
        )
        assert submitted.status_code == 200 and submitted.json()["polling_url"].startswith(f"http://127.0.0.1:{port}/")
        assert httpx.post(f"http://127.0.0.1:{port}/v1/flux-2-klein-4b", json={"prompt": "x"}).status_code == 401


# -- settings -----------------------------------------------------------------------------------------


def test_bfl_settings_defaults_follow_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    assert settings.bfl_api_key is None and settings.bfl_api_url == "https://api.bfl.ai"
    assert settings.bfl_model == "flux-2-klein-4b" and settings.bfl_max_active_tasks == 24
    assert settings.bfl_safety_tolerance == 2
    monkeypatch.setenv("SD_BFL_API_KEY", "  ")
    assert Settings(_env_file=None).bfl_api_key is None  # an empty key means "not configured"


@pytest.mark.parametrize(
    "url",
    ["http://api.bfl.ai", "ftp://api.bfl.ai", "https://user:pw@api.bfl.ai", "https://api.bfl.ai/?x=1", "api.bfl.ai"],
)
def test_bfl_api_url_must_be_https_unless_loopback(url: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None, bfl_api_url=url)
    assert "SD_BFL_API_URL" in str(raised.value)


def test_regional_and_loopback_api_urls_are_accepted() -> None:
    assert load_settings(_env_file=None, bfl_api_url="https://api.eu.bfl.ai/").bfl_api_url == "https://api.eu.bfl.ai"
    assert load_settings(_env_file=None, bfl_api_url="http://127.0.0.1:8787").bfl_api_url == "http://127.0.0.1:8787"


def test_model_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_BFL_MODELS", "flux-dev, flux-2-pro")
    with pytest.raises(SettingsError, match="SD_BFL_MODEL must be one of SD_BFL_MODELS"):
        load_settings(_env_file=None)
    monkeypatch.setenv("SD_BFL_MODEL", "flux-dev")
    assert load_settings(_env_file=None).bfl_models == ["flux-dev", "flux-2-pro"]
    monkeypatch.setenv("SD_BFL_MODELS", "flux-dev,flux-9000")
    with pytest.raises(SettingsError, match="flux-9000"):
        load_settings(_env_file=None)


def test_a_bad_setting_never_echoes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_BFL_API_KEY", CANARY_KEY)
    monkeypatch.setenv("SD_BFL_MAX_ACTIVE_TASKS", "many")
    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)
    assert CANARY_KEY not in str(raised.value)
    assert CANARY_KEY not in repr(Settings(_env_file=None, bfl_max_active_tasks=3))


async def test_stalled_progress_does_not_make_polling_faster(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    # Progress that claims 99% from the start: a naive estimate would poll at the floor all along.
    bfl = start_fake(generation_time=2.0, fixed_progress=0.99)
    backend = FluxApiBackend(bfl_settings(bfl, bfl_poll_interval=0.2, bfl_poll_max_interval=0.4))
    ctx = context()
    task = asyncio.ensure_future(run(backend, ctx, seed=1, width=256, height=256))
    await asyncio.sleep(1.5)
    polls = bfl.fake.count("poll")
    ctx.cancel_all()
    with pytest.raises(JobCancelledError):
        await task
    await backend.close()
    # The backoff alone polls at 0.2, 0.5, 0.9, 1.3 s (4 polls); aiming every other time adds about 3.
    # Aiming every time would poll every 0.05 s: about 27 polls.
    assert polls <= 8, polls


async def test_a_poll_aimed_at_the_finish_lands_after_it_when_the_submit_answer_was_slow(
    start_fake: Callable[..., RunningFake], bfl_settings: Callable[..., Settings]
) -> None:
    """The task's age counts from when the submit was sent: BFL started it then, not when its answer
    came back. Counting from the answer (0.8 s late here), the aimed poll lands before the finish and
    the next one a whole backoff later (3 polls, ~0.7 s lost); from the send, 2 polls."""
    bfl = start_fake(generation_time=2.0, submit_delay=0.8)
    backend = FluxApiBackend(bfl_settings(bfl, bfl_poll_interval=0.5, bfl_poll_max_interval=2.0))
    images = await run(backend, context(), seed=1, width=256, height=256)
    await backend.close()
    assert len(images[0]) == 1 and images[0][0].encoded is not None
    # first poll 0.5 s after the answer (task age 1.3 s, progress 0.65), then one aimed at age ~2.0 s
    # (a first poll delayed past the finish by a busy machine finds it ready: 1)
    assert bfl.fake.count("poll") <= 2, bfl.fake.count("poll")
