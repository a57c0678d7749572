"""Run the real app under uvicorn on a loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class LiveServer:
    def __init__(self, app: Any, config: uvicorn.Config | None = None, **options: Any) -> None:
        """`config`: run exactly this uvicorn configuration (its port should be 0); else the defaults
        below with `options` (uvicorn.Config's) over them."""
        self.app = app
        # A long keep-alive: a test process that also runs many clients can leave a connection idle
        # for seconds, and a server closing it just as the client reuses it is a client-side race.
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "log_level": "warning",
            "lifespan": "on",
            "timeout_graceful_shutdown": 5,
            "timeout_keep_alive": 60,
        }
        self.config = config if config is not None else uvicorn.Config(app, **{**settings, **options})
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(client: Any, timeout: float = 120.0) -> dict[str, Any]:
    """Poll /health until 200; return its body."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/health")
        if response.status_code == 200:
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready: {response.json()}")
        time.sleep(0.05)
