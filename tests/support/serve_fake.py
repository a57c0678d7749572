"""Run the real service with the fake backend as default, in its own process (restart and signal
tests kill it for real). Settings come from SD_* variables like the real service;
FAKE_STEP_DELAY sets the fake's per-step delay. FAKE_LOCAL=1 adds the fake local backend
(tests/support/fake_local.py, in the device process unless SD_DEVICE_ISOLATION=thread) and makes it
the default."""

from __future__ import annotations

import argparse
import os

import uvicorn

from imagegen.backends.registry import BackendFactory
from imagegen.config import load_settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.fake_local import FakeLocalBackend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = load_settings(_env_file=None, host="127.0.0.1", port=args.port)
    delay = float(os.environ.get("FAKE_STEP_DELAY", "0.005"))
    factories: dict[str, BackendFactory] = {"fake": lambda s: FakeBackend(s, step_delay=delay)}
    default = "fake"
    if os.environ.get("FAKE_LOCAL") == "1":
        factories["fake-local"] = FakeLocalBackend
        default = "fake-local"
    app = create_app(settings, backend_factories=factories, default_backend=default)
    uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        )
    ).run()


if __name__ == "__main__":
    main()
