"""Run the real service with the fake backend as default, in its own process (restart and signal
tests kill it for real; cluster tests run several as API replicas). Settings come from SD_* variables
like the real service; FAKE_STEP_DELAY and friends configure the fake (fake_backend.from_env).
FAKE_LOCAL=1 adds the fake local backend (tests/support/fake_local.py, in the device process unless
SD_DEVICE_ISOLATION=thread) and makes it the default."""

from __future__ import annotations

import argparse
import os

import uvicorn

from imagegen.api.connections import server_config
from imagegen.backends.registry import BackendFactory
from imagegen.config import load_settings
from imagegen.main import create_app
from tests.support.fake_backend import from_env
from tests.support.fake_local import FakeLocalBackend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = load_settings(_env_file=None, host="127.0.0.1", port=args.port)
    factories: dict[str, BackendFactory] = {"fake": from_env}
    default = "fake"
    if os.environ.get("FAKE_LOCAL") == "1":
        factories["fake-local"] = FakeLocalBackend
        default = "fake-local"
    app = create_app(settings, backend_factories=factories, default_backend=default)
    # The configuration `imagegen serve` runs: the same protocol, timeouts and bound on connections.
    uvicorn.Server(server_config(app, settings, log_level="warning")).run()


if __name__ == "__main__":
    main()
