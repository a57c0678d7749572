"""`imagegen models list | pull`: which models the configuration uses, which are in SD_MODEL_DIR,
which a running service has loaded; and pre-downloading them for offline use.

`pull` writes exactly where the service reads: hub models into the Hugging Face cache layout under
SD_MODEL_DIR (what `from_pretrained(..., cache_dir=SD_MODEL_DIR)` looks up, also with
HF_HUB_OFFLINE=1), built-in tiny models into SD_MODEL_DIR/builtin/, and a local folder into
SD_MODEL_DIR/local/<name>.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What a diffusers pipeline needs to load with use_safetensors=True and no variant: the index, each
#: component's configs and tokenizer files, and full-precision safetensors weights (sharded ones too).
#: Left out: single-file checkpoints at the top level, .ckpt/.bin/.onnx/... and fp16 or non-EMA
#: variants, which the service never loads and which are often several times the size of what it does.
PIPELINE_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/*.jinja",
    "*/*.tiktoken",
    "*/*.safetensors",
]
#: The standalone safety checker: two subfolders of a pipeline repository.
CHECKER_PATTERNS = ["safety_checker/*.json", "safety_checker/*.safetensors", "feature_extractor/*.json"]
IGNORE_PATTERNS = [
    "*.fp16.*",
    "*.bf16.*",
    "*non_ema*",
    "*.ckpt",
    "*.bin",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.pb",
    "*.h5",
    "*.pt",
    "*.pth",
    "*.gguf",
]
LOCAL_SUBDIR = "local"


@dataclass(frozen=True)
class ConfiguredModel:
    model_id: str
    used_by: str  # a backend id, or a description
    backend: str | None  # the backend whose "loaded" state applies


def _fail(message: str, code: int = 1) -> int:
    print(f"imagegen: {message}", file=sys.stderr)
    return code


def _settings() -> Any:
    from imagegen.config import load_settings

    return load_settings()


def configured_models(settings: Any) -> list[ConfiguredModel]:
    models = [ConfiguredModel(settings.model_id, "sd", "sd")]
    # The models sd may switch to (SD_MODELS): `pull` fetches them too, so they work offline.
    models += [
        ConfiguredModel(extra, "sd (SD_MODELS)", "sd") for extra in settings.models if extra != settings.model_id
    ]
    if settings.safety_checker:
        models.append(ConfiguredModel(settings.safety_checker_id, "safety checker (models without their own)", None))
    models.append(ConfiguredModel(settings.flux_model_id, "flux-local", "flux-local"))
    if settings.safety_checker:
        from imagegen.backends.local import tiny_models

        # Built-in models are paired with the built-in checker instead (backends/local/safety.py).
        if any(
            tiny_models.checker_for(settings.safety_checker_id, model.model_id) != settings.safety_checker_id
            for model in models
        ):
            models.append(ConfiguredModel(tiny_models.TINY_SAFETY_CHECKER, "safety checker (built-in models)", None))
    models.append(ConfiguredModel(settings.bfl_model, "flux-api (cloud)", "flux-api"))
    return models


def hub_cache_folder(model_dir: Path, repo_id: str) -> Path:
    return Path(model_dir) / ("models--" + repo_id.replace("/", "--"))


def _is_repo_id(model_id: str) -> bool:
    from imagegen.backends.local.support import _REPO_ID

    return bool(_REPO_ID.match(model_id))


def source_kind(model_id: str, used_by: str = "") -> str:
    from imagegen.backends.local import tiny_models

    if "cloud" in used_by:
        return "cloud"
    if tiny_models.is_builtin(model_id):
        return "built-in"
    if Path(model_id).expanduser().is_dir():
        return "folder"
    return "hub" if _is_repo_id(model_id) else "invalid"


def cache_state(model_dir: Path, model_id: str, kind: str) -> tuple[str, int | None]:
    """("yes" | "partial" | "no" | "-", bytes) for one model in SD_MODEL_DIR."""
    from imagegen.backends.local import tiny_models
    from imagegen.storage.disk_usage import folder_size

    if kind == "built-in":
        folder = tiny_models.builtin_path(model_dir, model_id)
        if (folder / tiny_models.COMPLETE_MARKER).exists():
            return "yes", folder_size(folder)[0]
        return "no", None
    if kind == "folder":
        folder = Path(model_id).expanduser()
        return ("yes" if (folder / "model_index.json").exists() else "partial"), folder_size(folder)[0]
    if kind != "hub":
        return "-", None
    folder = hub_cache_folder(model_dir, model_id)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return "no", None
    complete = any(
        (snapshot / "model_index.json").exists() or (snapshot / "safety_checker" / "config.json").exists()
        for snapshot in snapshots.iterdir()
    )
    return ("yes" if complete else "partial"), folder_size(folder)[0]


def other_models(model_dir: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """Models in SD_MODEL_DIR that the configuration does not name: (id or folder, kind, bytes)."""
    from imagegen.backends.local import tiny_models
    from imagegen.storage.disk_usage import folder_size

    found: list[tuple[str, str, int]] = []
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return found
    for entry in sorted(model_dir.iterdir()):
        if entry.is_dir() and entry.name.startswith("models--"):
            repo_id = entry.name[len("models--") :].replace("--", "/", 1)
            if repo_id not in known:
                found.append((repo_id, "hub", folder_size(entry)[0]))
    for subdir, kind in ((tiny_models.BUILTIN_SUBDIR, "built-in"), (LOCAL_SUBDIR, "folder")):
        parent = model_dir / subdir
        if parent.is_dir():
            for entry in sorted(parent.iterdir()):
                name = entry.name if kind == "built-in" else str(entry)
                if entry.is_dir() and not entry.name.startswith(".") and name not in known:
                    found.append((name, kind, folder_size(entry)[0]))
    return found


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return "-"


def _server_backends(url: str, key: str | None) -> dict[str, Any]:
    """GET /api/backends of a running service."""
    import httpx

    response = httpx.get(url.rstrip("/") + "/api/backends", headers={"X-API-Key": key} if key else {}, timeout=10)
    if response.status_code != 200:
        from imagegen.commands.generate import describe_response_error

        raise RuntimeError(describe_response_error(response))
    listing: dict[str, Any] = response.json()
    return listing


def server_rows(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model a running service offers, from its GET /api/backends: the backend, whether it is
    what a request naming nothing gets, the backend's state, and whether that model is loaded now."""
    rows = []
    for backend in listing["backends"]:
        current = backend.get("model")
        for model in backend["capabilities"]["models"]:
            rows.append(
                {
                    "model": model,
                    "backend": backend["id"],
                    "default": "yes" if backend.get("default") and model == current else "no",
                    "state": backend["state"],
                    "loaded": "yes" if backend.get("loaded") and model == current else "no",
                    "reason": backend.get("reason", "") if model == current else "",
                }
            )
    return rows


def _run_list_server(args: argparse.Namespace) -> int:
    from imagegen.commands.generate import api_key

    try:
        listing = _server_backends(args.url, api_key(args))
    except Exception as error:  # noqa: BLE001 - say why, whatever it was
        return _fail(f"could not ask {args.url} for its models: {error}", 2)
    rows = server_rows(listing)
    if args.json:
        print(json.dumps({"url": args.url, "default_backend": listing.get("default"), "models": rows}, indent=2))
        return 0
    print(f"models of {args.url} (default backend: {listing.get('default')})")
    headers = ["MODEL", "BACKEND", "DEFAULT", "STATE", "LOADED"]
    table = [[row["model"], row["backend"], row["default"], row["state"], row["loaded"]] for row in rows]
    _print_table(headers, table)
    for row in rows:
        if row["state"] != "ready" and row["reason"]:
            print(f"{row['backend']}: {row['reason']}")
    return 0


def _print_table(headers: list[str], table: list[list[Any]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *table, strict=False)]
    for line in [headers, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip())


def run_list(args: argparse.Namespace) -> int:
    """With --url: the models a running service offers. Without: what this machine's settings configure,
    and what SD_MODEL_DIR holds."""
    if args.url:
        return _run_list_server(args)
    from imagegen.config import SettingsError

    try:
        settings = _settings()
    except SettingsError as error:
        return _fail(str(error), 2)
    rows: list[dict[str, Any]] = []
    for model in configured_models(settings):
        kind = source_kind(model.model_id, model.used_by)
        cached, size = cache_state(settings.model_dir, model.model_id, kind)
        row = {"model": model.model_id, "used_by": model.used_by, "source": kind, "cached": cached, "bytes": size}
        rows.append(row)
    known = {model.model_id for model in configured_models(settings)}
    for model_id, kind, size in other_models(settings.model_dir, known):
        rows.append(
            {
                "model": model_id,
                "used_by": "(not configured)",
                "source": kind,
                "cached": "yes",
                "bytes": size,
            }
        )
    if args.json:
        print(json.dumps({"model_dir": str(Path(settings.model_dir).absolute()), "models": rows}, indent=2))
        return 0
    print(f"SD_MODEL_DIR: {Path(settings.model_dir).absolute()}")
    headers = ["MODEL", "USED BY", "SOURCE", "CACHED", "SIZE"]
    table = [[row["model"], row["used_by"], row["source"], row["cached"], _size(row["bytes"])] for row in rows]
    _print_table(headers, table)
    print("(these settings' models; `--url URL` lists what a running service offers and has loaded)")
    return 0


# -- pull -------------------------------------------------------------------------------------------


def _matches(relative: str, allow: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in allow) and not any(
        fnmatch.fnmatch(relative, pattern) for pattern in IGNORE_PATTERNS
    )


def copy_folder(source: Path, model_dir: Path) -> Path:
    """Copy a local diffusers folder into SD_MODEL_DIR/local/<name>, files the service loads only.

    Copied into a temporary sibling, then renamed into place: an interrupted copy never looks complete."""
    target = Path(model_dir) / LOCAL_SUBDIR / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=target.parent))
    copied = 0
    try:
        for folder, dirs, names in os.walk(source, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                path = Path(folder) / name
                relative = path.relative_to(source).as_posix()
                if path.is_symlink() or not _matches(relative, PIPELINE_PATTERNS):
                    continue
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / relative)
                copied += path.stat().st_size
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"copied {_size(copied)} into {target}", file=sys.stderr)
    return target


def download(repo_id: str, settings: Any, patterns: list[str]) -> Path:
    """snapshot_download into the Hugging Face cache layout under SD_MODEL_DIR, with its progress bars."""
    from huggingface_hub import snapshot_download

    token = settings.huggingface_token.get_secret_value() if settings.huggingface_token is not None else None
    path = snapshot_download(
        repo_id,
        cache_dir=str(settings.model_dir),
        token=token,
        allow_patterns=patterns,
        ignore_patterns=IGNORE_PATTERNS,
    )
    return Path(path)


def _pipeline_has_own_checker(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # not a pipeline folder we can read: nothing to add
    entry = index.get("safety_checker")
    return isinstance(entry, list) and any(entry)


def pull_one(model_id: str, settings: Any, patterns: list[str] = PIPELINE_PATTERNS) -> Path:
    """Make one model available offline; its folder. Raises what loading would raise."""
    from imagegen.backends.local import tiny_models
    from imagegen.errors import BackendUnavailableError

    if tiny_models.is_builtin(model_id):
        print(
            f"building built-in {model_id} into {Path(settings.model_dir) / tiny_models.BUILTIN_SUBDIR}",
            file=sys.stderr,
        )
        return tiny_models.ensure_builtin(Path(settings.model_dir), model_id)
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        if patterns is not PIPELINE_PATTERNS:
            return folder  # a checker folder is read where it is (SD_SAFETY_CHECKER_ID names it)
        if not (folder / "model_index.json").exists():
            raise BackendUnavailableError(f"'{model_id}' is not a diffusers pipeline folder (no model_index.json)")
        if Path(settings.model_dir).absolute() in folder.absolute().parents:
            return folder  # already in SD_MODEL_DIR
        return copy_folder(folder, Path(settings.model_dir))
    if not _is_repo_id(model_id):
        raise BackendUnavailableError(
            f"'{model_id}' is not a built-in model, an existing folder, or a Hugging Face repository id (owner/name)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        print("note: HF_HUB_OFFLINE is set, so nothing is downloaded; unset it to pull", file=sys.stderr)
    print(f"downloading {model_id} into {settings.model_dir}", file=sys.stderr)
    return download(model_id, settings, patterns)


def run_pull(args: argparse.Namespace) -> int:
    if getattr(args, "lora", None):
        from imagegen.commands import lora_pull

        return lora_pull.run(args)
    from imagegen.backends.local import tiny_models
    from imagegen.backends.local.support import describe_load_error
    from imagegen.config import SettingsError

    try:
        settings = _settings()
    except SettingsError as error:
        return _fail(str(error), 2)
    model_id = args.model_id
    if model_id is None:
        backend = args.backend or "sd"
        by_backend: dict[str | None, str] = {}
        for model in configured_models(settings):
            by_backend.setdefault(model.backend, model.model_id)  # a backend's first model is its default
        if backend not in by_backend or backend == "flux-api":
            return _fail(f"backend '{backend}' has no local model to pull", 2)
        model_id = by_backend[backend]
    try:
        folder = pull_one(model_id, settings)
    except Exception as error:  # noqa: BLE001 - every failure gets the operator-facing reason
        return _fail(f"could not pull '{model_id}': {describe_load_error(error, model_id)}")
    print(folder)
    if not (folder / "model_index.json").exists():
        print(
            f"warning: {model_id} has no model_index.json: it is not a diffusers pipeline the service can load",
            file=sys.stderr,
        )
    if settings.safety_checker and not args.no_safety_checker and not _pipeline_has_own_checker(folder):
        checker = tiny_models.checker_for(settings.safety_checker_id, model_id)  # what the service loads
        print(f"{model_id} has no safety checker of its own: pulling {checker} (SD_SAFETY_CHECKER_ID)", file=sys.stderr)
        try:
            print(pull_one(checker, settings, CHECKER_PATTERNS))
        except Exception as error:  # noqa: BLE001
            return _fail(f"could not pull the safety checker '{checker}': {describe_load_error(error, checker)}")
    return 0
