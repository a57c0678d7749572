"""The torch boundary: only src/imagegen/backends/local/ imports torch, diffusers or transformers, and
the service runs without them (an API-only install, a machine without the `local` extra).

Two proofs: every import statement of the package is read (function-level imports included), and
the app is started in a fresh interpreter in which those libraries cannot be imported at all, then
asked every read-only route and a generation on each kind of backend.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "imagegen"
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
TORCH_SIDE = PACKAGE / "backends" / "local"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_only_the_local_backends_import_torch_or_diffusers() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if TORCH_SIDE in path.parents:
            continue
        for name in _imports(path):
            if name.split(".")[0] in HEAVY:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


# Runs in a fresh interpreter: a finder at the head of sys.meta_path makes the heavy libraries
# unimportable (find_spec answers None, import raises ImportError), as on a machine without them.
_SCRIPT = r"""
import importlib.abc, json, sys

BLOCKED = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
import importlib.util
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = find_spec

import httpx
from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.server import LiveServer

root = sys.argv[2]
settings = Settings(_env_file=None, model_id="tiny-sd", flux_model_id="tiny-flux2-klein", model_dir=root + "/models",
                    output_dir=root + "/outputs", data_dir=root + "/data", host="127.0.0.1", default_backend="sd")
app = create_app(settings)
answers = {}
with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
    for path in ("/health", "/health/live", "/api/backends", "/info", "/metrics", "/", "/v1/models",
                 "/sdapi/v1/sd-models", "/sdapi/v1/options", "/api/jobs", "/api/images", "/openapi.json"):
        answers["GET " + path] = client.get(path).status_code
    for backend in ("sd", "flux-local", "flux-api"):
        response = client.post("/api/txt2img", json={"prompt": "a fox", "backend": backend, "width": 64, "height": 64})
        answers["txt2img " + backend] = [response.status_code, response.json()["error"]["type"]]
    answers["states"] = {b["id"]: b["state"] for b in client.get("/api/backends").json()["backends"]}
answers["heavy"] = sorted(name for name in BLOCKED if name in sys.modules)
print("RESULT " + json.dumps(answers))
"""


def test_the_service_runs_with_torch_and_diffusers_unimportable(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ",".join(HEAVY), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    answers = json.loads(lines[-1].removeprefix("RESULT "))
    assert answers.pop("heavy") == []
    states = answers.pop("states")
    # The local backends say why they cannot run; flux-api has no key here.
    assert states == {"sd": "unavailable", "flux-local": "unavailable", "flux-api": "not_configured"}
    assert answers.pop("GET /health") == 503  # the default backend (sd) cannot run: not ready, and says so
    for route, status in answers.items():
        if route.startswith("GET "):
            assert status == 200, route
        else:
            code, kind = status
            assert 400 <= code < 500 or code == 503, (route, code, kind)
    assert "Traceback" not in done.stderr
