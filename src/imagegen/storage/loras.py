"""The LoRA folder (SD_LORA_DIR): which adapters exist, what each fits, and finding one by name
without ever leaving the folder. No torch: headers are JSON (storage/lora_format.py).

A LoRA's name is its file's stem (`add-detail.safetensors` is `add-detail`). Only `.safetensors` files
in the folder itself are LoRAs (never pickles: `.ckpt`, `.pt`, `.bin` are not listed and cannot be
named). A name is looked up, never joined into a path as given: names with a path separator, a
leading dot or a control character are refused, and a symlink counts only when its target is a file
inside the folder. Headers and hashes are cached per file version (size, modification time).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.errors import InvalidParameterError
from imagegen.storage.lora_format import LoraHeader, NotSafetensorsError, describe

SUFFIX = ".safetensors"
#: A name that can only ever mean a file directly in the folder (and fits A1111's `<lora:name:w>`).
_NAME = re.compile(r"^[^./\\\x00-\x1f\x7f:<>\"|?*][^/\\\x00-\x1f\x7f:<>\"|?*]{0,199}$")
_PARAM = "loras"


@dataclass(frozen=True)
class LoraFile:
    """One LoRA in the folder."""

    name: str
    #: The file (a symlink's target, which lies in the folder).
    path: Path
    size: int
    mtime_ns: int
    header: LoraHeader

    @property
    def version(self) -> tuple[str, int, int]:
        """Changes when the file is replaced or rewritten: loaded adapters are keyed by it."""
        return (str(self.path), self.size, self.mtime_ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "filename": self.name + SUFFIX,
            "size_bytes": self.size,
            **self.header.family.to_dict(),
            "layers": self.header.layers,
        }


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name == name.strip()


class LoraCatalog:
    """The LoRA files of one folder. Thread-safe; every call looks at the folder as it is now."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._headers: dict[tuple[str, int, int], LoraHeader | None] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}

    def refresh(self) -> None:
        """Forget cached headers and hashes (files are looked at again on the next call)."""
        with self._lock:
            self._headers.clear()
            self._hashes.clear()

    def _real_root(self) -> Path | None:
        try:
            return self.root.resolve(strict=True)
        except OSError:
            return None

    def _entry(self, root: Path, name: str) -> LoraFile | NotSafetensorsError | None:
        """The LoRA file `name` in the folder; None when there is none (or it leaves the folder)."""
        candidate = root / (name + SUFFIX)
        try:
            info = os.lstat(candidate)
            if stat.S_ISLNK(info.st_mode):
                target = candidate.resolve(strict=True)
                if target.parent != root and root not in target.parents:
                    return None  # a symlink out of the folder is not one of its LoRAs
                info = os.stat(target)
                candidate = target
        except (OSError, RuntimeError):  # missing, dangling, or a symlink loop
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        key = (str(candidate), info.st_size, info.st_mtime_ns)
        with self._lock:
            known = key in self._headers
            header = self._headers.get(key)
        if not known:
            try:
                header = describe(candidate)
            except NotSafetensorsError:
                header = None
            except OSError:
                return None
            with self._lock:
                self._headers[key] = header
        if header is None:
            return NotSafetensorsError("not a safetensors file")
        return LoraFile(name, candidate, info.st_size, info.st_mtime_ns, header)

    def list(self) -> list[LoraFile]:
        """Every usable LoRA in the folder, by name (files that are not safetensors are left out)."""
        root = self._real_root()
        if root is None:
            return []
        found: list[LoraFile] = []
        try:
            names = sorted(entry.name for entry in os.scandir(root))
        except OSError:
            return []
        for filename in names:
            if not filename.endswith(SUFFIX):
                continue
            name = filename[: -len(SUFFIX)]
            if not valid_name(name):
                continue
            entry = self._entry(root, name)
            if isinstance(entry, LoraFile):
                found.append(entry)
        return found

    def get(self, name: str) -> LoraFile:
        """The LoRA named `name`; InvalidParameterError (param `loras`) when there is no such file,
        the name could leave the folder, or the file is not a safetensors file."""
        if not isinstance(name, str) or not valid_name(name):
            raise InvalidParameterError(
                "a LoRA name is a file name in SD_LORA_DIR without its .safetensors suffix "
                "(no path separators, no leading dot)",
                param=_PARAM,
            )
        root = self._real_root()
        entry = self._entry(root, name) if root is not None else None
        if entry is None:
            raise InvalidParameterError(
                "unknown LoRA: no such .safetensors file in SD_LORA_DIR (GET /api/loras lists them)", param=_PARAM
            )
        if isinstance(entry, NotSafetensorsError):
            raise InvalidParameterError(
                f"LoRA '{name}' is not a safetensors file (only safetensors are loaded, never pickles)", param=_PARAM
            )
        return entry

    def sha256(self, entry: LoraFile) -> str:
        """The file's SHA-256 (hex), computed once per file version."""
        with self._lock:
            known = self._hashes.get(entry.version)
        if known is not None:
            return known
        digest = hashlib.sha256()
        with open(entry.path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        with self._lock:
            self._hashes[entry.version] = value
        return value
