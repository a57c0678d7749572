"""Run the real service with the fake backend as default, in its own process (restart and signal
tests kill it for real). Settings come from SD_* variables like the real service;
FAKE_STEP_DELAY sets the fake's per-step delay."""

from __future__ import annotations

import argparse
import os

import uvicorn

from imagegen.api.connections import server_config
from imagegen.config import load_settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = load_settings(_env_file=None, host="127.0.0.1", port=args.port)
    delay = float(os.environ.get("FAKE_STEP_DELAY", "0.005"))
    app = create_app(
        settings,
        backend_factories={"fake": lambda s: FakeBackend(s, step_delay=delay)},
        default_backend="fake",
    )
    # The configuration `imagegen serve` runs: the same protocol, timeouts and bound on connections.
    uvicorn.Server(server_config(app, settings, log_level="warning")).run()


if __name__ == "__main__":
    main()
