"""Run the real service with the fake backend as default, in its own process (restart and signal
tests kill it for real; cluster tests run several as API replicas). Settings come from SD_* variables
like the real service; FAKE_STEP_DELAY and friends configure the fake (fake_backend.from_env)."""

from __future__ import annotations

import argparse

import uvicorn

from imagegen.config import load_settings
from imagegen.main import create_app
from tests.support.fake_backend import from_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = load_settings(_env_file=None, host="127.0.0.1", port=args.port)
    app = create_app(settings, backend_factories={"fake": from_env}, default_backend="fake")
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
