"""Shared helpers of the local diffusers backends: device and dtype, model sources, memory, errors.

Only loading and generation paths import this module's torch-using functions; importing the module
itself stays cheap (torch is imported inside the functions).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.backends.local import tiny_models
from imagegen.config import Settings
from imagegen.errors import BackendUnavailableError

log = logging.getLogger("imagegen.backends")

# Hub repository ids: "owner/name" with the characters the hub allows.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def quiet_libraries() -> None:
    """No loading progress bars or advisory chatter in the service log. Call before the first
    import of diffusers/transformers: some of their notices are printed at import time."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def pick_device(choice: str) -> str:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if choice == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if choice == "cuda" and not cuda:
        raise BackendUnavailableError("SD_DEVICE=cuda but PyTorch sees no CUDA device (is this a CPU build of torch?)")
    if choice == "mps" and not mps:
        raise BackendUnavailableError("SD_DEVICE=mps but PyTorch's MPS backend is not available on this machine")
    return choice


def pick_dtype(device: str, family: str) -> Any:  # a torch.dtype
    """The dtype for a device and model family.

    CPU: float32 (half precision is many times slower there). MPS: float32 (float16 gives black
    images on MPS). CUDA: float16 for SD/SDXL; bfloat16 for FLUX (float16 FLUX gives NaN/black
    images), float32 where the GPU has no bfloat16.
    """
    import torch

    if device == "cuda":
        if family == "flux":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float16
    return torch.float32


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` loads a model from, and with which keyword arguments."""

    location: str
    local: bool
    kwargs: dict[str, Any]

    def model_index(self) -> dict[str, Any] | None:
        """The model's model_index.json if it is on disk (local folder or already in the cache)."""
        return self.read_json("model_index.json")

    def read_json(self, filename: str) -> dict[str, Any] | None:
        """A JSON file of the model (e.g. "transformer/config.json") if it is on disk; never downloads."""
        path: Path | None = None
        if self.local:
            path = Path(self.location) / filename
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(self.location, filename, cache_dir=self.kwargs.get("cache_dir"))
                path = Path(found) if isinstance(found, str) else None
            except Exception:  # noqa: BLE001 - a cache miss is not an error here
                path = None
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def model_source(model_id: str, settings: Settings) -> ModelSource:
    """Resolve a model id: a built-in tiny model, a local folder, or a hub repository id.

    A mistyped local path would silently be treated as a hub id by from_pretrained: anything that
    looks like a path but is not a folder is refused here with a clear message.
    """
    common: dict[str, Any] = {"use_safetensors": True}
    if tiny_models.is_builtin(model_id):
        folder = tiny_models.ensure_builtin(settings.model_dir, model_id)
        return ModelSource(str(folder), True, {**common, "local_files_only": True})
    path = Path(model_id).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), True, {**common, "local_files_only": True})
    if not _REPO_ID.match(model_id):
        raise BackendUnavailableError(
            f"model folder '{model_id}' does not exist and is not a Hugging Face repository id (owner/name)"
        )
    kwargs: dict[str, Any] = {**common, "cache_dir": str(settings.model_dir)}
    if settings.huggingface_token is not None:
        kwargs["token"] = settings.huggingface_token.get_secret_value()
    if hub_offline():
        kwargs["local_files_only"] = True
    return ModelSource(model_id, False, kwargs)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: hub models load from the cache only (no network call at all)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(model_id: str) -> bool:
    """A Hugging Face repository id (owner/name), not a built-in model or an existing folder."""
    return (
        not tiny_models.is_builtin(model_id)
        and not Path(model_id).expanduser().is_dir()
        and bool(_REPO_ID.match(model_id))
    )


def _cached_json(repo_id: str, filename: str, settings: Settings) -> dict[str, Any] | None:
    """A JSON file of a hub repository from the cache under SD_MODEL_DIR ({} when cached but unreadable),
    or None when it is not there. Never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(settings.model_dir))
    except Exception:  # noqa: BLE001 - huggingface_hub missing or a damaged cache: not cached
        return None
    if not isinstance(found, str) or not Path(found).is_file():
        return None
    try:
        loaded = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def uncached_hub_models(model_id: str, settings: Settings, *, standalone_checker: bool | None) -> list[str]:
    """The hub repositories that loading `model_id` needs and the cache under SD_MODEL_DIR lacks: the
    model itself, and the standalone safety checker (SD_SAFETY_CHECKER_ID) when the model needs one.
    standalone_checker None: the model's own model_index.json says (SD 1.x ships its own checker).
    Cheap (a few file lookups), no torch, never a network call."""
    missing: list[str] = []
    index: dict[str, Any] | None = None
    if is_hub_id(model_id):
        index = _cached_json(model_id, "model_index.json", settings)
        if index is None:
            missing.append(model_id)
    if not settings.safety_checker:
        return missing
    if standalone_checker is None:
        if index is None:
            return missing  # a folder or built-in model: its own files decide when it loads
        entry = index.get("safety_checker")
        standalone_checker = not (isinstance(entry, list) and any(entry))
    checker = tiny_models.checker_for(settings.safety_checker_id, model_id)
    if (
        standalone_checker
        and is_hub_id(checker)
        and _cached_json(checker, "safety_checker/config.json", settings) is None
    ):
        missing.append(checker)
    return missing


def uncached_reason(missing: list[str], pull: str, *, why: str = "HF_HUB_OFFLINE is set") -> str:
    """What to do about hub models that are not in the cache while the hub cannot be used; `pull` is
    the command that fetches them (e.g. `imagegen models pull --backend flux-local`)."""
    names = ", ".join(f"'{name}'" for name in missing)
    return (
        f"{names} {'is' if len(missing) == 1 else 'are'} not in the model cache (SD_MODEL_DIR) and {why}: "
        f"run `{pull}` where the network works, then start again"
    )


def _error_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def describe_load_error(error: BaseException, model_id: str) -> str:
    """An operator-actionable reason for a failed load: auth, not found, network, or disk.

    Libraries wrap the real cause (diffusers raises "does not appear to have a file named ..."
    from huggingface_hub's offline or HTTP error): the whole chain is considered."""
    for cause in _error_chain(error):
        reason = _describe_one(cause, model_id)
        if reason is not None:
            return reason
    return f"loading '{model_id}' failed: {type(error).__name__}"


_AUTH_ERRORS = ("GatedRepoError",)
_NOT_FOUND_ERRORS = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError")
_NETWORK_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ReadTimeout")


def _describe_one(error: BaseException, model_id: str) -> str | None:
    name = type(error).__name__
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, BackendUnavailableError):
        return error.message
    if isinstance(error, OSError) and error.errno == 28:
        return "no space left on the device holding SD_MODEL_DIR"
    if isinstance(error, PermissionError):
        return "SD_MODEL_DIR (or the model folder) is not writable/readable by the service user"
    if name in _AUTH_ERRORS or status in (401, 403):
        return (
            f"access to '{model_id}' was refused by the Hugging Face hub (gated or private): "
            "accept its licence on the hub and set SD_HUGGINGFACE_TOKEN"
        )
    if name in _NOT_FOUND_ERRORS or status == 404:
        return (
            f"'{model_id}' was not found on the Hugging Face hub (check the model id; "
            "private repositories need SD_HUGGINGFACE_TOKEN)"
        )
    if name in _NETWORK_ERRORS or isinstance(error, (ConnectionError, TimeoutError)):
        return (
            f"'{model_id}' is not in the model cache (SD_MODEL_DIR) and the Hugging Face hub could not be "
            "reached: check the network (or HF_HUB_OFFLINE), set SD_HUGGINGFACE_TOKEN if rate limited, "
            "or pre-download the model"
        )
    return None


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return "out of memory" in text and isinstance(error, RuntimeError)


def is_fatal_device_error(error: BaseException) -> bool:
    """CUDA errors that leave the context unusable (device-side asserts, illegal accesses)."""
    text = str(error)
    return (
        isinstance(error, RuntimeError)
        and ("CUDA error" in text or "cudaError" in text)
        and not is_out_of_memory(error)
    )


def _trim_c_heap() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed memory inside its heaps whenever a
    live allocation sits above it, so without this the RSS of a long-running service does not fall
    after a pipeline is unloaded. No-op where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Drop what Python still holds and return cached accelerator memory to the driver."""
    gc.collect()
    _trim_c_heap()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


def cpu_generators(seeds: list[int]) -> list[Any]:  # torch.Generator
    """One CPU generator per image: the same seed gives the same image on any device."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def accelerator_memory() -> list[tuple[str, str, int]]:
    """(device, kind, bytes) for the accelerators torch already uses: per CUDA device what torch has
    allocated and reserved and the device's total, on MPS what is allocated and what the driver holds.

    Never imports torch: [] until a local backend has. Allocator statistics and device properties
    create no CUDA context, so a /metrics scrape never takes memory on a GPU the service does not use."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    found: list[tuple[str, str, int]] = []
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                found.append((device, "allocated", int(torch.cuda.memory_allocated(index))))
                found.append((device, "reserved", int(torch.cuda.memory_reserved(index))))
                found.append((device, "total", int(torch.cuda.get_device_properties(index).total_memory)))
        mps = getattr(torch, "mps", None)
        if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            found.append(("mps", "allocated", int(mps.current_allocated_memory())))
            found.append(("mps", "driver_allocated", int(mps.driver_allocated_memory())))
    except Exception:
        log.debug("could not read accelerator memory", exc_info=True)
    return found


#: What /health shows of the device a pipeline is on: {device kind: (key, ...)}.
_HEALTH_MEMORY = {"cuda": ("allocated", "reserved"), "mps": ("allocated",)}


def memory_in_use(device: str | None) -> dict[str, Any]:
    """Process RSS and, where torch is loaded, the accelerator's allocated/reserved memory on the
    device a pipeline is on ("cuda" is torch's current CUDA device)."""
    import psutil

    data: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss}
    kinds = _HEALTH_MEMORY.get(device or "")
    torch = sys.modules.get("torch")
    if not kinds or torch is None:
        return data
    name = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
    for found_device, kind, value in accelerator_memory():
        if found_device == name and kind in kinds:
            data[f"{device}_{kind}_bytes"] = value
    return data


def devices_seen() -> dict[str, Any]:
    """Devices visible to torch. Only meaningful once torch is imported by a local backend; the
    API never imports torch just to answer /info."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {"torch_loaded": False, "note": "torch is imported when a local backend first loads"}
    data: dict[str, Any] = {"torch_loaded": True, "cpu": {"threads": torch.get_num_threads()}}
    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"index": index, "name": props.name, "total_bytes": int(total), "free_bytes": int(free)})
        data["cuda"] = devices
    else:
        data["cuda"] = []
    mps = getattr(torch.backends, "mps", None)
    data["mps"] = bool(mps and mps.is_available())
    return data
