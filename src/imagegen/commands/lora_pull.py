"""`imagegen models pull --lora SOURCE`: put a LoRA into SD_LORA_DIR, from the Hugging Face hub
(`owner/name`, with `--file` when the repository holds several .safetensors files) or from a local
file. Only safetensors files are accepted (the header is read and checked first, never a pickle);
the file is written under a temporary name and renamed into place, so the service never sees half
a file. Its name in requests is `--name`, else the file's stem.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from imagegen.storage.lora_format import NotSafetensorsError, describe
from imagegen.storage.loras import SUFFIX, valid_name


class PullError(Exception):
    """A message for the operator (exit code 1 or 2)."""


def _hub_file(repo_id: str, filename: str | None, settings: Any) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    token = settings.huggingface_token.get_secret_value() if settings.huggingface_token is not None else None
    if filename is None:
        found = [name for name in list_repo_files(repo_id, token=token) if name.endswith(SUFFIX) and "/" not in name]
        if len(found) != 1:
            listed = ", ".join(found) or "none"
            raise PullError(
                f"{repo_id} holds {len(found)} .safetensors files at its top ({listed}): pick one with --file"
            )
        filename = found[0]
    print(f"downloading {filename} from {repo_id}", file=sys.stderr)
    return Path(hf_hub_download(repo_id, filename, cache_dir=str(settings.model_dir), token=token))


def pull_lora(source: str, settings: Any, *, filename: str | None = None, name: str | None = None) -> Path:
    """Copy one LoRA into SD_LORA_DIR; its path there."""
    from imagegen.backends.local.support import _REPO_ID

    local = Path(source).expanduser()
    if local.is_file():
        origin = local
    elif _REPO_ID.match(source):
        origin = _hub_file(source, filename, settings)
    else:
        raise PullError(f"'{source}' is neither a file nor a Hugging Face repository id (owner/name)")
    if not origin.name.endswith(SUFFIX):
        raise PullError("only .safetensors LoRA files are accepted (never .ckpt/.pt/.bin pickles)")
    try:
        header = describe(origin)
    except NotSafetensorsError as error:
        raise PullError(f"{origin.name} is {error}") from None
    stem = name or origin.name[: -len(SUFFIX)]
    if not valid_name(stem):
        raise PullError("the LoRA's name must be a plain file name (no path separators, ':', '<', '>', leading dot)")
    folder: Path = settings.lora_folder
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (stem + SUFFIX)
    handle, staging = tempfile.mkstemp(prefix=".pull-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        shutil.copyfile(origin, staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    print(f"LoRA '{stem}' ({header.family.label}, {header.layers} layers) in {folder}", file=sys.stderr)
    return target


def run(args: Any) -> int:
    from imagegen.backends.local.support import describe_load_error
    from imagegen.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return 2
    try:
        print(pull_lora(args.lora, settings, filename=args.file, name=args.name))
    except PullError as error:
        print(f"imagegen: could not pull the LoRA: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - hub and disk failures get the operator-facing reason
        print(f"imagegen: could not pull the LoRA: {describe_load_error(error, args.lora)}", file=sys.stderr)
        return 1
    return 0
