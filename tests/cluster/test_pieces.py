"""The pieces of distributed mode that need no cluster: the settings, the worker command's refusals,
the shared-folder heuristic, the fleet's routing answers, and the embedded default never loading the
`redis` package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagegen.backends.base import BackendState
from imagegen.config import Settings, SettingsError, load_settings
from imagegen.engine.distributed.connection import describe
from imagegen.engine.distributed.fleet import BackendReport, Fleet, WorkerReport
from imagegen.storage.shared import output_sharing
from tests.support.cluster import Deployer
from tests.support.process import ROOT, service_env
from tests.support.redis_server import RedisServer, available

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /mnt/nfs-out rw,relatime shared:20 - nfs4 fs.internal:/exports/out rw,vers=4.2
41 22 8:17 / /data rw,relatime shared:21 - xfs /dev/sdb1 rw
42 22 0:41 / /mnt/bucket rw,nosuid shared:22 - fuse.s3fs s3fs rw
43 22 8:33 / /mnt/usb rw shared:23 - fuseblk /dev/sdc1 rw
44 22 0:42 / /mnt/with\\040space rw shared:24 - cifs //nas/share rw
"""


@pytest.mark.parametrize(
    ("path", "shared", "fstype"),
    [
        ("/mnt/nfs-out/images", True, "nfs4"),
        ("/mnt/bucket", True, "fuse.s3fs"),
        ("/mnt/with space/out", True, "cifs"),
        ("/srv/outputs", False, "ext4"),
        ("/data/outputs", None, "xfs"),
        ("/mnt/usb/outputs", None, "fuseblk"),
    ],
)
def test_the_output_folder_heuristic(path: str, shared: bool | None, fstype: str) -> None:
    found = output_sharing(Path(path), MOUNTINFO)
    assert (found.shared, found.fstype) == (shared, fstype)
    message = found.message(Path(path))
    assert path in message
    if shared is False:
        assert "looks local" in message


def test_the_redis_url_setting() -> None:
    assert Settings(_env_file=None).distributed is False
    settings = Settings(_env_file=None, redis_url="redis://:s3cret-pass@redis.internal:6380/2")
    assert settings.distributed and "s3cret" not in repr(settings)
    assert describe(settings) == "redis://redis.internal:6380/2"
    assert describe(Settings(_env_file=None, redis_url="unix:///run/redis.sock")) == "unix:/run/redis.sock"
    with pytest.raises(SettingsError) as refused:
        load_settings(_env_file=None, redis_url="http://:s3cret-pass@redis:6379")
    assert "SD_REDIS_URL" in str(refused.value) and "s3cret" not in str(refused.value)
    with pytest.raises(SettingsError):
        load_settings(_env_file=None, redis_prefix="has space")
    with pytest.raises(SettingsError):
        load_settings(_env_file=None, worker_lease_seconds=0.1)


def _worker(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "worker", *args],
        cwd=tmp_path,
        env=service_env(tmp_path, env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_worker_command_refuses_what_cannot_work(tmp_path: Path) -> None:
    alone = _worker(tmp_path)
    assert alone.returncode == 2 and "SD_REDIS_URL" in alone.stderr
    url = "unix:///nonexistent/redis.sock"
    unknown = _worker(tmp_path, "--backend", "nope", SD_REDIS_URL=url)
    assert unknown.returncode == 2 and "unknown backend nope" in unknown.stderr
    bad = _worker(tmp_path, "--backend-factory", "oops", SD_REDIS_URL=url)
    assert bad.returncode == 2 and "ID=MODULE:CALLABLE" in bad.stderr
    model = _worker(
        tmp_path,
        "--backend",
        "fake",
        "--backend-factory",
        "fake=tests.support.fake_backend:from_env",
        "--model",
        "not-offered",
        SD_REDIS_URL=url,
    )
    assert model.returncode == 2 and "not-offered" in model.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "worker", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--backend" in help_text and "--model" in help_text and "SD_REDIS_URL" in help_text


def _report(name: str, state: BackendState, models: tuple[str, ...] = ("m1",), age: float = 0.0) -> WorkerReport:
    return WorkerReport(
        name=name,
        seen_at=0.0,
        age=age,
        backends={"sd": BackendReport(state=state, reason=f"{name} says so", models=models)},
    )


def test_the_fleet_routes_admission() -> None:
    fleet = Fleet(lease=30)
    none = fleet.admission_error("sd", "m1")
    assert none is not None and none.status_code == 503 and none.headers["Retry-After"] == "30"
    fleet.update([_report("a", BackendState.NOT_CONFIGURED), _report("b", BackendState.UNAVAILABLE)])
    refused = fleet.admission_error("sd", None)
    assert refused is not None and refused.status_code == 422 and refused.error_type == "backend_not_configured"
    fleet.update([_report("a", BackendState.READY, models=("m1",))])
    assert fleet.admission_error("sd", "m1") is None
    other = fleet.admission_error("sd", "m2")
    assert other is not None and other.status_code == 503 and other.param == "model"
    # A worker gone quiet keeps its routes open for a while (it may be restarting), not for ever.
    fleet.update([_report("a", BackendState.READY, age=200)])
    assert fleet.live() == [] and fleet.admission_error("sd", "m1") is None
    fleet.update([_report("a", BackendState.READY, age=400)])
    assert fleet.admission_error("sd", "m1") is not None


def test_the_embedded_default_never_imports_redis(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from imagegen.config import Settings\n"
        "from imagegen.main import create_app\n"
        "from tests.support.fake_backend import FakeBackend\n"
        f"settings = Settings(_env_file=None, output_dir={str(tmp_path / 'o')!r}, data_dir={str(tmp_path / 'd')!r})\n"
        "app = create_app(settings, backend_factories={'fake': FakeBackend}, default_backend='fake')\n"
        "with TestClient(app) as client:\n"
        "    assert client.post('/api/txt2img', json={'prompt': 'x'}).status_code == 200\n"
        "assert 'redis' not in sys.modules, 'the embedded engine imported redis'\n"
        "assert 'imagegen.engine.distributed' not in sys.modules\n"
    )
    env = {**service_env(tmp_path, {}), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not available(), reason="redis-server is not installed here")
def test_the_redis_password_never_shows(tmp_path: Path) -> None:
    """SD_REDIS_URL may carry a password: never in a log line, an answer or /metrics, not even while
    Redis is down (error paths log too)."""
    password = "redis-canary-7f3e9a"
    server = RedisServer(tmp_path / "redis", tcp=True, password=password).start()
    made = Deployer("redis", tmp_path / "cluster", tmp_path / "models", server.url)
    try:
        d = made(log_level="debug")
        replica = d.add_replica(SD_LOG_LEVEL="debug")
        assert replica.post("/api/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200
        answers = [replica.get(path).text for path in ("/health", "/info", "/api/backends", "/metrics", "/api/jobs")]
        server.kill()
        answers += [replica.get(path).text for path in ("/health", "/api/jobs")]
        answers.append(replica.post("/api/jobs", json={"prompt": "x"}).text)
        time.sleep(1.5)  # the loops notice and log
        logs = [path.read_text(errors="replace") for path in (tmp_path / "cluster").rglob("*.log")]
        assert logs and any("unreachable" in text for text in logs)
        assert all(password not in text for text in answers + logs)
    finally:
        made.close()
        server.kill()
