"""Start the real service in its own process for a benchmark, the way an operator would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    def __init__(self, model_dir: Path, **env: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SD_")}
        self.env.update(
            SD_HOST="127.0.0.1",
            SD_PORT=str(self.port),
            SD_MODEL_DIR=str(model_dir),
            SD_OUTPUT_DIR=str(self.tmp / "outputs"),
            SD_DATA_DIR=str(self.tmp / "data"),
            SD_LOG_LEVEL="warning",
            HF_HUB_OFFLINE="1",
            **env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0

    def __enter__(self) -> Service:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagegen.cli", "serve"],
            cwd=self.tmp,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "server.log", "wb"),
        )
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError((self.tmp / "server.log").read_text())
                time.sleep(0.02)
        self.ready_seconds = time.perf_counter() - started
        return self

    def rss_bytes(self) -> int:
        import psutil

        assert self.process is not None
        return psutil.Process(self.process.pid).memory_info().rss

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
