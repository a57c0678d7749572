"""Start-up errors an operator can act on: the port taken, a folder that cannot be written, no
space, a model that cannot be downloaded (its reason in the log and in /health)."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from imagegen import preflight
from tests.support.cli import cli_env, run_cli
from tests.support.process import free_port


def _dirs(tmp_path: Path) -> dict[str, str]:
    return {
        "SD_OUTPUT_DIR": str(tmp_path / "o"),
        "SD_DATA_DIR": str(tmp_path / "d"),
        "SD_MODEL_DIR": str(tmp_path / "m"),
    }


def test_port_in_use_says_which_port_and_how_to_find_the_process(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path, timeout=60, **_dirs(tmp_path)
        )
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
    assert f"lsof -ti:{port}" in result.stderr and "--port" in result.stderr


def test_unwritable_data_folder_stops_serve_with_the_setting_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    env = {**_dirs(tmp_path), "SD_DATA_DIR": str(blocker / "data")}
    result = run_cli("serve", "--host", "127.0.0.1", "--port", "1", cwd=tmp_path, timeout=60, **env)
    assert result.returncode == 1
    assert "cannot start: SD_DATA_DIR=" in result.stderr and "a file is in the way" in result.stderr


def test_model_folder_problems_are_warnings_not_errors(tmp_path: Path, make_settings) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    findings = preflight.check(make_settings(model_dir=blocker / "models"))
    assert findings.errors == []
    assert len(findings.warnings) == 1 and "SD_MODEL_DIR" in findings.warnings[0]
    assert "HF_HUB_OFFLINE=1" in findings.warnings[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere: a read-only folder needs a non-root user")
def test_read_only_output_folder_is_an_error(tmp_path: Path, make_settings) -> None:  # type: ignore[no-untyped-def]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    outputs.chmod(0o500)
    try:
        findings = preflight.check(make_settings(output_dir=outputs))
    finally:
        outputs.chmod(0o700)
    assert findings.errors and "is not writable by uid" in findings.errors[0]


def test_write_errors_are_described_for_an_operator() -> None:
    path = Path("/srv/outputs")
    full = preflight.describe_write_error("SD_OUTPUT_DIR", path, OSError(errno.ENOSPC, "No space left on device"))
    assert "no space left" in full and "SD_OUTPUT_DIR" in full
    denied = preflight.describe_write_error("SD_MODEL_DIR", path, PermissionError(errno.EACCES, "Permission denied"))
    assert "not writable" in denied and "uid 10001" in denied
    read_only = preflight.describe_write_error("SD_DATA_DIR", path, OSError(errno.EROFS, "Read-only file system"))
    assert "not writable" in read_only


def test_download_failure_reaches_the_log_and_health(serve: Callable[..., httpx.Client]) -> None:
    # Attached before the app starts (create_app keeps handlers it did not install), so the line
    # logged by the background load cannot be missed.
    buffer = io.StringIO()
    listener = logging.StreamHandler(buffer)
    listener.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger("imagegen").addHandler(listener)
    try:
        client = serve(model_id="someone/not-cached-model", ready=False, log_level="info")
        deadline = time.monotonic() + 30
        while "load failed" not in buffer.getvalue():
            assert time.monotonic() < deadline, "no load failure logged"
            time.sleep(0.05)
    finally:
        logging.getLogger("imagegen").removeHandler(listener)
    line = next(line for line in buffer.getvalue().splitlines() if "load failed" in line)
    assert line.startswith("ERROR") and "could not be reached" in line and "SD_HUGGINGFACE_TOKEN" in line
    body = client.get("/health").json()
    assert body["status"] == "error" and "SD_HUGGINGFACE_TOKEN" in body["backends"]["sd"]["reason"]


# -- started by uvicorn directly: the operator spec's command, and the README's -------------------------


def _uvicorn(target: str, host: str, port: int, tmp_path: Path) -> subprocess.Popen[str]:
    # flux-api without a key as the default: nothing loads, the app is up at once.
    env = cli_env(**_dirs(tmp_path), SD_DEFAULT_BACKEND="flux-api", SD_LOG_LEVEL="info")
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", target, "--host", host, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _serve_then_stop(process: subprocess.Popen[str], port: int) -> str:
    """Wait until the app answers, let the start-up checks speak, stop it; its whole log."""
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # the bound-socket check runs right after start-up
    finally:
        process.send_signal(signal.SIGINT)
    return process.communicate(timeout=30)[0]


def test_uvicorn_on_loopback_gives_no_false_public_warning(tmp_path: Path) -> None:
    port = free_port()
    log = _serve_then_stop(_uvicorn("imagegen.main:app", "127.0.0.1", port, tmp_path), port)
    assert "Application startup complete" in log
    assert "SECURITY" not in log  # SD_HOST defaults to 0.0.0.0, but uvicorn was told 127.0.0.1


def test_the_operator_spec_command_runs_unchanged(tmp_path: Path) -> None:
    """`uvicorn app.main:app --host 0.0.0.0 --port 7860` (the spec's command; another port here): the
    installed `app` package serves the same app, and the warning names the public address it listens on."""
    port = free_port()
    log = _serve_then_stop(_uvicorn("app.main:app", "0.0.0.0", port, tmp_path), port)
    assert f"SECURITY: listening on 0.0.0.0:{port} without SD_API_KEY" in log
    import app.main

    assert app.main.__file__.endswith("src/app/main.py")  # the checkout's, installed by the package


def test_uvicorn_on_a_busy_port_says_what_imagegen_serve_says(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _uvicorn("imagegen.main:app", "127.0.0.1", port, tmp_path)
        log = process.communicate(timeout=60)[0]
    assert process.returncode != 0
    assert f"port {port} is already in use (a previous instance?)" in log
    assert f"lsof -ti:{port}" in log and "--port / SD_PORT" in log
