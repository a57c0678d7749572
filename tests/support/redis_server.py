"""A real Redis server for tests and benchmarks (Debian's `redis-server`; never Docker): on a unix
socket (default) or a free loopback port, with `appendonly yes` in its own folder, killed with
SIGKILL and restarted on the same data for real.

Plain Python, no pytest: bench/ imports it too.

    with RedisServer() as server:    # server.url: unix:///tmp/.../redis.sock
        ...
        server.kill()                # SIGKILL, like a crash
        server.start()               # the same folder: the AOF brings back every acknowledged write
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.process import free_port

REDIS_SERVER = "redis-server"
INSTALL_HINT = "apt-get install -y redis-server (Debian's package; .ci/run installs it)"


def available() -> bool:
    return shutil.which(REDIS_SERVER) is not None


class RedisServer:
    def __init__(
        self, folder: Path | None = None, *, tcp: bool = False, fsync: str = "always", password: str | None = None
    ) -> None:
        # A short folder: a unix socket path must fit in 107 bytes.
        self.folder = folder if folder is not None else Path(tempfile.mkdtemp(prefix="rds-", dir="/tmp"))
        self.tcp = tcp
        self.fsync = fsync
        self.password = password
        self.port = free_port() if tcp else 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.folder / "redis.sock"

    @property
    def url(self) -> str:
        if self.tcp:
            auth = f":{self.password}@" if self.password else ""
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}{query}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        if not self.tcp:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer within {timeout:g} s: {self.log()}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        """True when the server answers PING (and has loaded its data)."""
        try:
            if self.tcp:
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            else:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(1)
                conn.connect(str(self.socket_path))
            with conn:
                if self.password:
                    conn.sendall(f"AUTH {self.password}\r\n".encode())
                    if not conn.recv(64).startswith(b"+OK"):
                        return False
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()
