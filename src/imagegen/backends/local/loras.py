"""LoRA adapters on a loaded diffusers pipeline: load once, keep (bounded, least recently used
first out), switch per batch with `set_adapters`, never fuse, and check what was loaded.

Why adapters stay unfused: PEFT computes `W x + w * B A x` with `W` untouched, so a job without
LoRAs after one with them runs the very weights it ran before (bit for bit, which the tests check).
Fusing writes `W + w B A` into the weights and unfusing subtracts it again, which does not restore
them exactly in floating point (measured on the tiny SD model: 32 UNet tensors up to 6e-8 off after one
fuse/unfuse, and the images differ; docs/loras.md): over many jobs the base model would drift. The unfused extra
matmul per adapted layer is the price (bench/bench_loras.py measures it).

Why loading is checked: diffusers only logs a warning when a LoRA's names match nothing in the model
(an SD LoRA on FLUX) and loads nothing. After every load the adapted layers are counted against the
file's; fewer is a 422 naming the LoRA and the model, and whatever was injected is removed.

Text encoders: diffusers hands their part to transformers' `load_adapter`, which (transformers 5.24)
demands a PEFT release newer than any published; the same injection is done here with PEFT itself
(`inject_adapter_in_model` + `set_peft_model_state_dict`), as transformers would do it.

Everything here runs on the device thread, under the backend's lock.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagegen.errors import InvalidParameterError
from imagegen.generation import LoraWeight
from imagegen.storage.loras import LoraCatalog, LoraFile

log = logging.getLogger("imagegen.backends")


@dataclass
class Adapter:
    """One LoRA loaded into the pipeline under `adapter_name`."""

    name: str
    adapter_name: str
    version: tuple[str, int, int]
    sha256: str
    layers: int
    bytes: int
    load_seconds: float


class AdapterSet:
    """The adapters loaded into one pipeline (it lives and dies with the LoadedPipeline)."""

    def __init__(self, pipe: Any, catalog: LoraCatalog, max_loaded: int, description: str) -> None:
        self.pipe = pipe
        self.catalog = catalog
        self.max_loaded = max_loaded
        #: "model 'x' on backend 'y'": the model side of a mismatch message
        self.description = description
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()  # by LoRA name, least recently used first
        self._active: tuple[tuple[str, float], ...] | None = ()  # what the pipeline runs with now
        self._counter = 0
        self.loads = 0
        self.evictions = 0

    # -- per batch ---------------------------------------------------------------------------------
    def activate(self, loras: Sequence[LoraWeight]) -> list[dict[str, Any]]:
        """Make the pipeline run with exactly these LoRAs and weights (none: the base model alone).

        Returns what was applied, per LoRA: name, weight and the file's sha256 (recorded with every
        image). Raises InvalidParameterError when a LoRA does not fit the model."""
        wanted = tuple((lora.name, float(lora.weight)) for lora in loras)
        applied: list[dict[str, Any]] = []
        for lora in loras:
            adapter = self._ensure(self.catalog.get(lora.name))  # the folder is checked again here
            applied.append({"name": lora.name, "weight": float(lora.weight), "sha256": adapter.sha256})
        if wanted == self._active:
            return applied
        if not wanted:
            self._enable(False)  # base layers only: the same computation as before any LoRA
        else:
            self._enable(True)
            self.pipe.set_adapters(
                [self._loaded[name].adapter_name for name, _ in wanted], [weight for _, weight in wanted]
            )
        self._active = wanted
        return applied

    def _enable(self, enabled: bool) -> None:
        """Switch every adapter layer of every component on or off. (The pipeline's own
        enable_lora/disable_lora raise for a component that holds no adapter at all.)"""
        import torch
        from diffusers.utils.peft_utils import set_adapter_layers

        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                set_adapter_layers(component, enabled=enabled)

    # -- loading -------------------------------------------------------------------------------------
    def _ensure(self, entry: LoraFile) -> Adapter:
        adapter = self._loaded.get(entry.name)
        if adapter is not None and adapter.version == entry.version:
            self._loaded.move_to_end(entry.name)
            return adapter
        if adapter is not None:  # the file was replaced: its old weights go
            self._drop(adapter)
        self._make_room()
        adapter = self._load(entry)
        self._loaded[entry.name] = adapter
        return adapter

    def _make_room(self) -> None:
        # One request's LoRAs always fit (SD_MAX_LOADED_LORAS >= SD_MAX_LORAS); the ones the current
        # request uses were just moved to the end, so the front is what was used longest ago.
        while len(self._loaded) >= self.max_loaded:
            _, oldest = next(iter(self._loaded.items()))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, adapter: Adapter) -> None:
        self._loaded.pop(adapter.name, None)
        self._delete(adapter.adapter_name)
        self._active = None  # the active set may have named it
        log.info("LoRA %s unloaded (%s)", adapter.name, self.description)

    def _delete(self, adapter_name: str) -> None:
        try:
            self.pipe.delete_adapters([adapter_name])
        except Exception:  # removing what a failed load left: nothing more to do (logged)
            log.debug("delete_adapters(%s) failed", adapter_name, exc_info=True)

    def _load(self, entry: LoraFile) -> Adapter:
        from safetensors.torch import load_file

        self._counter += 1
        # PEFT keeps adapters in ModuleDicts: the name must be a plain identifier, unique per load.
        adapter_name = f"lora{self._counter}_" + re.sub(r"\W", "_", entry.name)[:40]
        started = time.monotonic()
        sha256 = self.catalog.sha256(entry)
        self._active = None
        try:
            state_dict = load_file(str(entry.path))
            with warnings.catch_warnings():
                # PEFT warns when a model gets a second adapter: that is the point here.
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.load_lora_into_text_encoder = _text_encoder_loader(self.pipe)
                try:
                    self.pipe.load_lora_weights(state_dict, adapter_name=adapter_name)
                finally:
                    del self.pipe.load_lora_into_text_encoder  # back to the class's own
        except Exception as error:  # noqa: BLE001 - every load failure is a LoRA that does not fit
            self._delete(adapter_name)
            log.info("LoRA %s failed to load on %s: %s", entry.name, self.description, error)
            raise InvalidParameterError(
                f"LoRA '{entry.name}' ({entry.header.family.label}) does not fit {self.description}: "
                "its layers do not match the model's",
                param="loras",
            ) from None
        layers, size = self._count(adapter_name)
        if layers < entry.header.layers or layers == 0:
            self._delete(adapter_name)
            found = "none" if layers == 0 else f"only {layers} of {entry.header.layers}"
            raise InvalidParameterError(
                f"LoRA '{entry.name}' ({entry.header.family.label}) does not fit {self.description}: "
                f"{found} of its layers match the model",
                param="loras",
            )
        seconds = time.monotonic() - started
        self.loads += 1
        mib = size / 2**20
        log.info("LoRA %s loaded on %s: %d layers, %.1f MiB, %.3fs", entry.name, self.description, layers, mib, seconds)
        return Adapter(entry.name, adapter_name, entry.version, sha256, layers, size, seconds)

    def _count(self, adapter_name: str) -> tuple[int, int]:
        """(layers adapted, bytes of adapter weights) for one adapter, over every component."""
        import torch

        layers = 0
        size = 0
        for component in self.pipe.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for module in component.modules():
                lora_a: Any = getattr(module, "lora_A", None)
                if isinstance(lora_a, torch.nn.ModuleDict) and adapter_name in lora_a:
                    layers += 1
                    lora_b: Any = getattr(module, "lora_B", {})
                    parts = [lora_a[adapter_name]] + ([lora_b[adapter_name]] if adapter_name in lora_b else [])
                    size += sum(p.numel() * p.element_size() for part in parts for p in part.parameters())
        return layers, size

    # -- reporting -------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "loaded": [
                {"name": a.name, "layers": a.layers, "bytes": a.bytes, "load_seconds": round(a.load_seconds, 3)}
                for a in self._loaded.values()
            ],
            "active": [{"name": name, "weight": weight} for name, weight in self._active or ()],
            "max_loaded": self.max_loaded,
            "loads": self.loads,
            "evictions": self.evictions,
        }


def _text_encoder_loader(pipe: Any) -> Any:
    """A stand-in for the pipeline's `load_lora_into_text_encoder` (same arguments): the text
    encoder's part of the state dict injected with PEFT directly (see the module docstring)."""

    def load(
        state_dict: dict[str, Any],
        network_alphas: dict[str, Any] | None,
        text_encoder: Any,
        prefix: str | None = None,
        lora_scale: float = 1.0,
        adapter_name: str = "default",
        metadata: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        from diffusers.utils.peft_utils import _create_lora_config, scale_lora_layers
        from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        prefix = prefix or "text_encoder"
        part = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if not part:
            return
        if metadata is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        alphas = None
        if network_alphas:
            alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items() if k.split(".")[0] == prefix}
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        rank = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
        config = _create_lora_config(part, alphas, metadata, rank, is_unet=False)
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
        result = set_peft_model_state_dict(text_encoder, part, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{len(unexpected)} text encoder LoRA tensors match no layer")
        scale_lora_layers(text_encoder, weight=lora_scale)
        text_encoder.to(device=text_encoder.device, dtype=text_encoder.dtype)

    return load
