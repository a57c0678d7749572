"""The `imagegen` command, run as a subprocess: generate (in-process and against a live server),
models list / pull, health, prune, and a --help that never imports torch.

Processes that import torch cost seconds each, so only two do (pull of a built-in model, then an
in-process generate with it); the rest run without torch."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegen.storage.metadata import read_metadata
from tests.support.cli import cli_env, run_cli
from tests.support.fake_backend import FakeBackend, seed_of
from tests.support.outputs import DAY, make_output, output_name


def test_help_is_fast_and_imports_nothing_heavy(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_cli("--help", cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "generate" in result.stdout and "prune" in result.stdout
    assert elapsed < 1.0, f"imagegen --help took {elapsed:.2f}s"
    code = (
        "import sys\n"
        "from imagegen import cli\n"
        "for argv in (['--help'], ['generate', '--help'], ['models', 'pull', '--help'], ['models', 'list', '--help'],"
        " ['health', '--help'], ['prune', '--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'numpy') if m in sys.modules))\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    assert "HEAVY []" in probe.stdout


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-models")


def test_pull_builtin_then_generate_in_process(cli_models: Path, tmp_path: Path) -> None:
    pulled = run_cli("models", "pull", "tiny-sd", cwd=tmp_path, SD_MODEL_DIR=str(cli_models))
    assert pulled.returncode == 0, pulled.stderr
    folder = cli_models / "builtin" / "tiny-sd"
    assert pulled.stdout.strip().splitlines() == [str(folder)]
    assert (folder / "model_index.json").exists() and (folder / ".imagegen-complete").exists()

    env = {
        "SD_MODEL_DIR": str(cli_models),
        "SD_OUTPUT_DIR": str(tmp_path / "outputs"),
        "SD_DATA_DIR": str(tmp_path / "data"),
    }
    # --model replaces the backend's model for this run (SD_MODEL_ID is the default hub model here).
    result = run_cli(
        "generate",
        "a red fox in the snow",
        "--model",
        "tiny-sd",
        "--seed",
        "7",
        "--steps",
        "3",
        "--out",
        "fox.png",
        cwd=tmp_path,
        **env,
    )
    assert result.returncode == 0, result.stderr
    assert "download" not in result.stderr  # a built-in model is never "downloading"
    assert result.stdout.strip() == "fox.png"
    assert "step 3/3" in result.stderr  # the progress bar (one line per step off a terminal)
    with Image.open(tmp_path / "fox.png") as image:
        assert image.format == "PNG" and image.size == (64, 64)
    meta = read_metadata(tmp_path / "fox.png")["imagegen"]
    assert meta["seed"] == 7 and meta["prompt"] == "a red fox in the snow" and meta["model"] == "tiny-sd"
    assert meta["steps"] == 3 and meta["backend"] == "sd"
    stored = list((tmp_path / "outputs").iterdir())
    assert len(stored) == 1 and stored[0].read_bytes() == (tmp_path / "fox.png").read_bytes()
    # In-process runs use a job store in memory: never the service's queue in SD_DATA_DIR.
    assert not (tmp_path / "data" / "jobs.sqlite3").exists()


def test_generate_against_a_live_server(serve: Callable[..., httpx.Client], tmp_path: Path) -> None:
    client = serve(
        factories={"fake": lambda settings: FakeBackend(settings)}, api_key="k-77", headers={"X-API-Key": "k-77"}
    )
    url = str(client.base_url)
    result = run_cli(
        "generate",
        "a castle",
        "--seed",
        "11",
        "--steps",
        "2",
        "--url",
        url,
        "--out",
        "castle.webp",
        cwd=tmp_path,
        SD_API_KEY="k-77",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "castle.webp" and "step 2/2" in result.stderr
    meta = read_metadata(tmp_path / "castle.webp")["imagegen"]
    assert meta["seed"] == 11 and meta["prompt"] == "a castle" and meta["backend"] == "sd"
    stored = client.get("/api/images").json()["images"][0]
    assert client.get(f"/api/images/{stored['name']}").content == (tmp_path / "castle.webp").read_bytes()

    # Several images from another backend; --api-key on the command line; the fake draws the seed.
    many = run_cli(
        "generate",
        "three foxes",
        "--backend",
        "fake",
        "--model",
        "fake-model",
        "--seed",
        "40",
        "-n",
        "3",
        "--url",
        url,
        "--api-key",
        "k-77",
        "--out",
        "fox.png",
        cwd=tmp_path,
    )
    assert many.returncode == 0, many.stderr
    assert many.stdout.split() == ["fox.png", "fox-2.png", "fox-3.png"]
    for index, name in enumerate(["fox.png", "fox-2.png", "fox-3.png"]):
        with Image.open(tmp_path / name) as image:
            assert seed_of(image) == 40 + index

    other = run_cli("generate", "x", "--model", "not-offered", "--url", url, cwd=tmp_path, SD_API_KEY="k-77")
    assert other.returncode == 2 and "422 invalid_parameter: model is not available" in other.stderr
    refused = run_cli("generate", "a castle", "--url", url, cwd=tmp_path)
    assert refused.returncode == 2 and "HTTP 401 authentication_error" in refused.stderr
    invalid = run_cli("generate", "a castle", "--steps", "0", "--url", url, cwd=tmp_path, SD_API_KEY="k-77")
    assert invalid.returncode == 2 and "422 invalid_parameter" in invalid.stderr
    unreachable = run_cli("generate", "x", "--url", "http://127.0.0.1:9", cwd=tmp_path)
    assert unreachable.returncode == 2 and "could not reach" in unreachable.stderr


JUNK = [
    "v1-5-pruned.ckpt",
    "model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    ".git/config",
]


def test_pull_a_local_folder_copies_what_loads(
    serve: Callable[..., httpx.Client], model_dir: Path, tmp_path: Path
) -> None:
    from imagegen.backends.local import tiny_models

    source = tmp_path / "my-model"
    shutil.copytree(tiny_models.ensure_builtin(model_dir, "tiny-sd"), source)
    for junk in JUNK:
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_bytes(b"junk")
    target_dir = tmp_path / "models"
    result = run_cli("models", "pull", str(source), cwd=tmp_path, SD_MODEL_DIR=str(target_dir))
    assert result.returncode == 0, result.stderr
    target = target_dir / "local" / "my-model"
    assert result.stdout.strip() == str(target)
    for junk in JUNK:
        assert not (target / junk).exists(), junk
    for needed in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ):
        assert (target / needed).exists(), needed
    # The copy loads and generates like the original.
    client = serve(model_id=str(target), model_dir=target_dir)
    assert client.post("/api/txt2img", json={"prompt": "x", "steps": 2, "seed": 1}).status_code == 200

    # A hub model cached by an earlier pull (the cache layout from_pretrained reads).
    snapshot = target_dir / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    listing = run_cli("models", "list", cwd=tmp_path, SD_MODEL_DIR=str(target_dir), SD_MODEL_ID=str(target))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[2:-1]}
    assert rows[str(target)][1:4] == ["sd", "folder", "yes"]
    assert rows["someone/cached"][1:5] == ["(not", "configured)", "hub", "yes"]
    assert rows["stable-diffusion-v1-5/stable-diffusion-v1-5"][-2:] == ["no", "-"]
    as_json = run_cli("models", "list", "--json", cwd=tmp_path, SD_MODEL_DIR=str(target_dir))
    assert '"cached": "yes"' in as_json.stdout

    # --url: the server's models, whatever this machine's settings say (SD_MODEL_ID names another model).
    served = run_cli("models", "list", "--url", str(client.base_url), cwd=tmp_path, SD_MODEL_ID="someone/cached")
    assert served.returncode == 0, served.stderr
    lines = served.stdout.splitlines()
    assert lines[0] == f"models of {client.base_url} (default backend: sd)"
    table = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:] if not line.split()[0].endswith(":")}
    assert table[(str(target), "sd")] == ["yes", "ready", "yes"]  # default, state, loaded
    assert all(model != "someone/cached" for model, _ in table)
    assert table[("flux-2-klein-4b", "flux-api")] == ["no", "not_configured", "no"]
    assert "flux-api: SD_BFL_API_KEY is not set" in lines
    # The default FLUX model is not in the cache and the tests run offline: not ready, and why.
    assert table[("black-forest-labs/FLUX.2-klein-4B", "flux-local")] == ["no", "error", "no"]
    reason = next(line for line in lines if line.startswith("flux-local: "))
    assert "not in the model cache" in reason and "HF_HUB_OFFLINE" in reason
    as_json = run_cli("models", "list", "--url", str(client.base_url), "--json", cwd=tmp_path)
    assert '"default_backend": "sd"' in as_json.stdout


def test_pull_failures_say_what_to_do(tmp_path: Path) -> None:
    offline = run_cli("models", "pull", "someone/not-there", cwd=tmp_path, SD_MODEL_DIR=str(tmp_path / "m"))
    assert offline.returncode == 1
    assert "could not be reached" in offline.stderr and "SD_HUGGINGFACE_TOKEN" in offline.stderr
    missing = run_cli("models", "pull", "./no/such/folder", cwd=tmp_path, SD_MODEL_DIR=str(tmp_path / "m"))
    assert missing.returncode == 1 and "not a built-in model, an existing folder" in missing.stderr
    not_pipeline = tmp_path / "empty"
    not_pipeline.mkdir()
    refused = run_cli("models", "pull", str(not_pipeline), cwd=tmp_path, SD_MODEL_DIR=str(tmp_path / "m"))
    assert refused.returncode == 1 and "no model_index.json" in refused.stderr


def test_health_command(serve: Callable[..., httpx.Client], tmp_path: Path) -> None:
    ready = serve(factories={"fake": lambda settings: FakeBackend(settings)}, default_backend="fake")
    ok = run_cli("health", "--url", str(ready.base_url), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ": ok (HTTP 200)" in ok.stdout and "fake" in ok.stdout
    quiet = run_cli("health", "--url", str(ready.base_url), "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == ""
    broken = serve(model_id=str(tmp_path / "missing-model"), ready=False)
    deadline = time.monotonic() + 30
    while broken.get("/health").json()["status"] != "error":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failing = run_cli("health", "--url", str(broken.base_url), cwd=tmp_path)
    assert failing.returncode == 1 and "does not exist" in failing.stdout
    down = run_cli("health", "--url", "http://127.0.0.1:9", cwd=tmp_path)
    assert down.returncode == 2 and "could not reach" in down.stderr


def test_prune_command(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    old = make_output(outputs, output_name(1), age=10 * DAY)
    young = make_output(outputs, output_name(2), age=1 * DAY)
    in_progress = make_output(outputs, ".tmp-x", age=30 * DAY)
    env = {"SD_OUTPUT_DIR": str(outputs)}
    dry = run_cli("prune", "--days", "2", "--dry-run", cwd=tmp_path, **env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"would delete {old.name} (100 bytes, older than the age limit)"]
    assert old.exists()
    real = run_cli("prune", "--days", "2", cwd=tmp_path, **env)
    assert real.returncode == 0 and not old.exists() and young.exists() and in_progress.exists()
    # The settings are the default limits.
    by_size = run_cli("prune", cwd=tmp_path, SD_OUTPUT_MAX_GB="0.00000005", **env)
    assert by_size.returncode == 0 and not young.exists() and in_progress.exists()
    # Files younger than five minutes stay whatever the limits, and the output says so, each by name.
    fresh = make_output(outputs, output_name(3), age=60)
    kept = run_cli("prune", "--days", "0.0001", cwd=tmp_path, **env)
    assert kept.returncode == 0 and fresh.exists()
    line = next(line for line in kept.stdout.splitlines() if fresh.name in line)
    assert line.startswith(f"kept {fresh.name} (100 bytes, written ") and "younger than 5 minutes" in line
    assert "1 kept (0.0 MB): 0 within the limits, 1 younger than 5 minutes" in kept.stderr
    listed = run_cli("prune", "--days", "30", "--verbose", cwd=tmp_path, **env)
    assert f"kept {fresh.name} (100 bytes, within the limits)" in listed.stdout
    helped = run_cli("prune", "--help", cwd=tmp_path)
    assert "5 minutes are never deleted" in " ".join(helped.stdout.split())
    nothing = run_cli("prune", cwd=tmp_path, **env)
    assert nothing.returncode == 0 and "nothing to prune" in nothing.stderr
    assert run_cli("prune", "--days", "0", cwd=tmp_path, **env).returncode == 2


def test_generate_from_an_image_in_process(cli_models: Path, tmp_path: Path) -> None:
    from tests.support.editing import gradient

    gradient(48, 32).save(tmp_path / "in.jpg", quality=95)
    env = {
        "SD_MODEL_DIR": str(cli_models),
        "SD_MODEL_ID": "tiny-sd",
        "SD_OUTPUT_DIR": str(tmp_path / "outputs"),
        "SD_DATA_DIR": str(tmp_path / "data"),
    }
    args = ("generate", "the same, in winter", "--image", "in.jpg", "--strength", "0.5", "--steps", "6")
    result = run_cli(*args, "--seed", "3", "--out", "out.png", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stderr  # int(6 x 0.5) steps
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (48, 32)  # the input's size
    meta = read_metadata(tmp_path / "out.png")["imagegen"]
    assert meta["mode"] == "img2img" and meta["strength"] == 0.5 and len(meta["input_images"]) == 1
    bad = run_cli("generate", "x", "--image", "missing.png", cwd=tmp_path, **env)
    assert bad.returncode == 2 and "cannot read missing.png" in bad.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    wrong = run_cli("generate", "x", "--image", "notes.txt", cwd=tmp_path, **env)
    assert wrong.returncode == 2 and "PNG, JPEG or WebP" in wrong.stderr


def test_generate_from_an_image_and_mask_against_a_server(serve: Callable[..., httpx.Client], tmp_path: Path) -> None:
    from tests.support.editing import gradient, half_mask

    client = serve(factories={"fake": lambda settings: FakeBackend(settings)}, default_backend="fake")
    gradient(40, 24).save(tmp_path / "in.png")
    half_mask(40, 24).save(tmp_path / "mask.png")
    args = ("generate", "a door", "--image", "in.png", "--mask", "mask.png", "--url", str(client.base_url))
    result = run_cli(*args, "--out", "door.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = client.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]
    assert job["parameters"]["mode"] == "inpaint" and job["parameters"]["strength"] == 1.0
    with Image.open(tmp_path / "door.png") as image:
        assert image.size == (40, 24)
    no_image = run_cli("generate", "x", "--mask", "mask.png", "--url", str(client.base_url), cwd=tmp_path)
    assert no_image.returncode == 2 and "--mask needs the --image" in no_image.stderr


def test_generate_offline_with_an_uncached_model_fails_at_once(tmp_path: Path) -> None:
    """No hub retries, no traceback, no "download may take minutes": one line saying what to do."""
    env = {
        "SD_MODEL_DIR": str(tmp_path / "m"),
        "SD_OUTPUT_DIR": str(tmp_path / "o"),
        "SD_DATA_DIR": str(tmp_path / "d"),
    }
    started = time.perf_counter()
    offline = run_cli("generate", "a fox", "--model", "someone/not-cached", cwd=tmp_path, **env)
    elapsed = time.perf_counter() - started
    assert offline.returncode == 1
    lines = offline.stderr.strip().splitlines()
    assert len(lines) == 1, offline.stderr
    assert lines[0] == (
        "imagegen: 'someone/not-cached' is not in the model cache (SD_MODEL_DIR) and HF_HUB_OFFLINE is set: "
        "run `imagegen models pull someone/not-cached` where the network works, then start again"
    )
    assert elapsed < 10, f"{elapsed:.1f}s"  # about one second of process start; the hub is never asked

    # Not offline by setting, but the hub cannot be reached (here: a port nobody listens on): the same,
    # at once, instead of half a minute of retries.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.perf_counter()
    unreachable = run_cli(
        "generate",
        "a fox",
        "--backend",
        "flux-local",
        "--model",
        "someone/not-cached-flux",
        cwd=tmp_path,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        **env,
    )
    elapsed = time.perf_counter() - started
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines() == [
        "imagegen: 'someone/not-cached-flux', 'stable-diffusion-v1-5/stable-diffusion-v1-5' are not in the model "
        "cache (SD_MODEL_DIR) and the Hugging Face hub (127.0.0.1) cannot be reached: run `imagegen models pull "
        "someone/not-cached-flux` where the network works, then start again"
    ]
    assert elapsed < 10, f"{elapsed:.1f}s"
