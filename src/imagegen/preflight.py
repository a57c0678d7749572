"""Start-up checks an operator can act on: folders that cannot be written, disks nearly full, the port
taken, a public address without a key.

`imagegen serve` refuses to start when the output or data folder cannot be written (nothing would
work); the service logs the same findings at start-up however it was started (uvicorn, Docker).
A model folder that cannot be written is only a warning: a read-only volume of pre-downloaded
models (HF_HUB_OFFLINE=1) is a sound way to run.

Started as `uvicorn imagegen.main:app --host ... --port ...`, the app cannot see uvicorn's options,
so what depends on the address is decided from what the process really does: the addresses it
listens on (read from the process's own sockets once the server has bound them), and uvicorn's own
"address already in use" error, which `PortInUseHint` turns into the message `imagegen serve` gives.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.engine.store import DB_DIR_MODE
from imagegen.storage.disk_usage import free_bytes
from imagegen.storage.outputs import DIR_MODE as OUTPUT_DIR_MODE

if TYPE_CHECKING:
    from imagegen.config import Settings

MB = 1_000_000
#: Below this much free space a warning is logged (a model download needs gigabytes, an image a few MB).
LOW_SPACE = {"SD_MODEL_DIR": 2_000 * MB, "SD_OUTPUT_DIR": 200 * MB, "SD_DATA_DIR": 50 * MB}


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _user() -> str:
    try:
        return f"uid {os.getuid()}"
    except AttributeError:  # pragma: no cover - Windows
        return "the service user"


def describe_write_error(name: str, path: Path, error: OSError) -> str:
    """What went wrong writing into a configured folder, and what to do about it."""
    if error.errno == errno.ENOSPC:
        return f"{name}={path}: no space left on the device; free some space or point {name} at a larger disk"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{name}={path} is not writable by {_user()}: give that user write access (in Docker: the named volume "
            f"or bind mount must belong to uid 10001), or point {name} elsewhere"
        )
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{name}={path} cannot be a folder: a file is in the way; point {name} elsewhere"
    return f"{name}={path} cannot be written: {error.strerror or type(error).__name__}"


def check_writable(path: Path, mode: int = 0o777) -> OSError | None:
    """Create the folder if needed (with `mode`, less the umask) and write a probe file in it; the
    error, if any."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        with tempfile.NamedTemporaryFile(prefix=".tmp-write-check-", dir=path):
            pass
    except OSError as error:
        return error
    return None


def check(settings: Settings) -> Findings:
    findings = Findings()
    # The modes the stores give the folders they create (outputs 0750, the job database's 0700).
    folders = (
        ("SD_OUTPUT_DIR", Path(settings.output_dir), True, OUTPUT_DIR_MODE),
        ("SD_DATA_DIR", Path(settings.data_dir), True, DB_DIR_MODE),
        ("SD_MODEL_DIR", Path(settings.model_dir), False, 0o777),
    )
    for name, path, required, mode in folders:
        error = check_writable(path, mode)
        if error is not None:
            message = describe_write_error(name, path, error)
            if required:
                findings.errors.append(message)
            else:
                findings.warnings.append(
                    message + "; models can then only be loaded from what is already there (HF_HUB_OFFLINE=1)"
                )
            continue
        free = free_bytes(path)
        if free is not None and free < LOW_SPACE[name]:
            findings.warnings.append(
                f"only {free / MB:.0f} MB free on the device holding {name}={path}"
                + (" (a model download needs several GB)" if name == "SD_MODEL_DIR" else "")
                + ("; set SD_OUTPUT_RETENTION_DAYS or SD_OUTPUT_MAX_GB" if name == "SD_OUTPUT_DIR" else "")
            )
    return findings


# -- the address the service listens on -----------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def port_in_use_message(port: int | None) -> str:
    """What to do when the port is taken: the same words whichever way the service was started."""
    if port is None:
        return (
            "the port is already in use (a previous instance?). Find the process with `lsof -ti:PORT` or "
            "`ss -ltnp 'sport = :PORT'`, stop it, or choose another port (--port / SD_PORT)."
        )
    return (
        f"port {port} is already in use (a previous instance?). Find the process with "
        f"`lsof -ti:{port}` or `ss -ltnp 'sport = :{port}'`, stop it, or choose "
        "another port with --port / SD_PORT."
    )


_BOUND_PORT = re.compile(r"address \(?'?[^,]*'?, (\d+)\)")


class PortInUseHint(logging.Filter):
    """Turns uvicorn's bind error ("[Errno 98] error while attempting to bind on address (...): address
    already in use", logged on `uvicorn.error` before it exits) into `port_in_use_message`."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.msg
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            found = _BOUND_PORT.search(str(error))
            record.msg = "imagegen: " + port_in_use_message(int(found.group(1)) if found else None)
            record.args = ()
        return True


def listening_addresses() -> list[tuple[str, int]]:
    """The TCP (address, port) pairs this process listens on (IPv4 and IPv6), from its own sockets."""
    import psutil

    found: list[tuple[str, int]] = []
    try:
        connections = psutil.Process().net_connections(kind="inet")
    except (psutil.Error, OSError):  # some platforms need privileges to list sockets
        return found
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr:
            found.append((str(connection.laddr.ip), int(connection.laddr.port)))
    return found


def public_addresses(addresses: list[tuple[str, int]]) -> list[str]:
    """The listening addresses other machines can reach, as "host:port" (loopback ones left out)."""
    public = []
    for host, port in addresses:
        try:
            if ipaddress.ip_address(host.split("%")[0]).is_loopback:
                continue
        except ValueError:
            continue
        public.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return sorted(set(public))
