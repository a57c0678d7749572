"""API fuzzing with schemathesis against the service's own OpenAPI document, every operation, over
real HTTP to a live service (the deterministic fake backend as default, the real tiny-sd pipeline
behind `backend: sd`).

Threat: malformed or extreme input crashing a handler (vllm-omni PR #3381: a size crashed the
server) or a response that breaks its own contract. Checks: no 5xx, responses (status codes,
content types, headers, bodies) conform to the schema, schema-invalid input is rejected with a 4xx,
405s name the allowed methods. Two checks are left out on purpose:
- positive_data_acceptance: a schema-valid request may still break a backend's own rules (a width
  that is no multiple of 8, a scheduler the backend lacks); that is a documented 422;
- use_after_free: DELETE /api/jobs/{id} cancels a job, it does not erase its record (finished jobs
  stay queryable by design).
A second, smaller run aims the generation routes at a backend that is not configured (flux-api
without a key, as the default): every answer must be a 4xx (backend_not_configured, OpenAI's
model_not_found), never the 503 that clients retry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.fake_bfl import FakeBFL
from tests.support.scrape import delta, scrape
from tests.support.server import LiveServer, wait_ready

pytestmark = pytest.mark.slow

SCHEMATHESIS = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or shutil.which("schemathesis")
KEY = "fuzz-key-canary-51c2"
BFL_KEY = "bfl_fuzz-key-3d4e"
CHECKS = ["all"]
EXCLUDED = ["positive_data_acceptance", "use_after_free"]


def fuzz_settings(root: Path, model_dir: Path, **overrides: Any) -> Settings:
    """The settings of a fuzzed service: tiny local models, the key, a queue that never fills."""
    values: dict[str, Any] = {
        "output_dir": root / "outputs",
        "data_dir": root / "data",
        "model_dir": model_dir,
        "model_id": "tiny-sd",
        "flux_model_id": "tiny-flux2-klein",
        "host": "127.0.0.1",
        "log_level": "error",
        "max_queue": 100_000,
        "api_key": KEY,
        # The tiny pipelines are quick at small sizes only: keep fuzzed sizes small.
        "max_width": 256,
        "max_height": 256,
        "max_pixels": 128 * 128,
    }
    return Settings(_env_file=None, **{**values, **overrides})


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[str, Path]]:
    """A live service with every backend working (the fake as default, tiny-sd, tiny-flux2-klein, and
    flux-api against the fake BFL server): a 5xx is then always a bug. Yields its URL and folder."""
    root = tmp_path_factory.mktemp("fuzz")
    bfl = FakeBFL(api_key=BFL_KEY, generation_time=0.01)
    with LiveServer(bfl.app) as bfl_server:
        settings = fuzz_settings(
            root,
            model_dir,
            bfl_api_key=BFL_KEY,
            bfl_api_url=bfl_server.url,
            bfl_poll_interval=0.01,
            bfl_poll_max_interval=0.05,
            max_loaded_pipelines=2,
        )
        app = create_app(
            settings, backend_factories={"fake": lambda s: FakeBackend(s, step_delay=0)}, default_backend="fake"
        )
        with LiveServer(app) as server, httpx.Client(base_url=server.url) as client:
            wait_ready(client)
            yield server.url, root


@pytest.fixture(scope="module")
def unconfigured_server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[str, Path]]:
    """A live service whose default backend is flux-api without SD_BFL_API_KEY: every generation
    request naming no backend (or an unknown OpenAI model) goes to a backend that is not configured."""
    root = tmp_path_factory.mktemp("fuzz-unconfigured")
    settings = fuzz_settings(root, model_dir, default_backend="flux-api")
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        health = client.get("/health", headers={"X-API-Key": KEY})
        assert health.status_code == 503 and health.json()["backends"]["flux-api"]["state"] == "not_configured"
        yield server.url, root


def run_schemathesis(url: str, report: Path, *extra: str, exclude: tuple[str, ...] = ()) -> dict:
    if SCHEMATHESIS is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    # The schema itself is behind the key: fetch it once, then point schemathesis at the service.
    schema = report.parent / "openapi.json"
    schema.write_bytes(httpx.get(f"{url}/openapi.json", headers={"X-API-Key": KEY}).raise_for_status().content)
    command = [
        SCHEMATHESIS,
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        str(schema),
        "--url",
        url,
        "--checks",
        ",".join(CHECKS),
        "--exclude-checks",
        ",".join((*EXCLUDED, *exclude)),
        "--no-color",
        "--generation-database",
        "none",
        "--seed",
        "20261127",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--request-timeout",
        "60",
        # Response time is a benchmark matter; on 2 shared cores a queued request may wait.
        "--max-response-time",
        "60",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=report.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return json.loads(report.read_text())


def test_every_operation_with_the_key(fuzz_server: tuple[str, Path], tmp_path: Path) -> None:
    url, _root = fuzz_server
    report = run_schemathesis(url, tmp_path / "report.json", "--max-examples", "120", "-H", f"X-API-Key: {KEY}")
    assert report["operations"]["tested"] == report["operations"]["total"] >= 30
    assert report["failures"] == [] and report["errors"] == []
    generated = report["test_cases"]["generated"]
    print(f"schemathesis generated {generated} cases with the key")
    assert generated >= 4000


def test_every_operation_without_the_key(fuzz_server: tuple[str, Path], tmp_path: Path) -> None:
    """Unauthenticated callers: every answer is a documented 401 in the envelope, never a 5xx.
    (unsupported_method is left out here: the key is checked before routing, so an unauthenticated
    caller gets 401 for any method and cannot map the API.)"""
    url, _ = fuzz_server
    report = run_schemathesis(
        url,
        tmp_path / "report.json",
        "--max-examples",
        "25",
        "--phases",
        "examples,coverage,fuzzing",
        exclude=("unsupported_method",),
    )
    assert report["failures"] == [] and report["errors"] == []
    generated = report["test_cases"]["generated"]
    print(f"schemathesis generated {generated} cases without the key")
    assert generated >= 1000


#: The routes that take generation requests (and the lists a client reads to pick a model); the
#: default checkpoint is left alone (POST /sdapi/v1/options could move it off flux-api).
GENERATION_ROUTES = r"^/(api/txt2img|api/jobs|sdapi/v1/txt2img|sdapi/v1/sd-models|v1/images/generations|v1/models)$"


def test_generation_routes_with_an_unconfigured_backend(unconfigured_server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = unconfigured_server
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}) as client:
        before = scrape(client)
        report = run_schemathesis(
            url,
            tmp_path / "report.json",
            "--max-examples",
            "20",
            "--include-path-regex",
            GENERATION_ROUTES,
            "-H",
            f"X-API-Key: {KEY}",
        )
        after = scrape(client)
        refused = client.post("/api/txt2img", json={"prompt": "a fox"}).json()["error"]
        assert refused["type"] == "backend_not_configured" and refused["param"] == "backend"
    assert report["failures"] == [] and report["errors"] == []
    assert report["operations"]["tested"] == 7
    generated = report["test_cases"]["generated"]
    print(f"schemathesis generated {generated} cases against an unconfigured backend")
    assert generated >= 300
    # The requests did reach the unconfigured backend, and were answered in each dialect's terms.
    refusals = [("/api/txt2img", "422"), ("/api/jobs", "422"), ("/sdapi/v1/txt2img", "422")]
    answered = {
        (path, status): delta(before, after, "imagegen_http_requests_total", route=path, method="POST", status=status)
        for path, status in [*refusals, ("/v1/images/generations", "404")]
    }
    assert all(count > 0 for count in answered.values()), answered
    server_errors = [
        labels
        for (name, labels), count in after.items()
        if name == "imagegen_http_requests_total"
        and dict(labels)["status"] >= "500"
        and count > before.get((name, labels), 0)
    ]
    assert server_errors == []
