"""What a LoRA file is, read from its safetensors header alone: no torch, no tensor data.

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON naming
every tensor (dtype, shape, offsets) and an optional `__metadata__` of strings. Nothing in it is
executed (unlike a pickle). From the tensor names and a few shapes we tell which model family a
LoRA was trained for:

- `sd` (SD 1.x / 2.x UNet) and `sdxl`: diffusers names (`unet.`, `text_encoder.`, `text_encoder_2.`)
  or kohya names (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`). A second text encoder, or
  the SGM block names kohya uses for SDXL (`input_blocks`, `middle_block`, `output_blocks`), mean
  SDXL. The cross-attention width (the input size of an `attn2.to_k` LoRA) tells SD 1.x (768) from
  SD 2.x (1024) and SDXL (2048), and must equal the UNet's `cross_attention_dim`.
- `flux2` (FLUX.2: fused `to_qkv_mlp_proj` and `ff.linear_in` layers) and `flux1` (FLUX.1:
  `proj_mlp`, `ff.net.0.proj`), in diffusers names; BFL/kohya names (`double_blocks`,
  `single_blocks`) say FLUX without the version: `flux`.
- anything else: `unknown`; loading it then decides (and checks what was loaded).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

#: The header of a real LoRA is kilobytes to a few MB; more is not a LoRA worth parsing.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Metadata values kept for listings (kohya writes whole tag-frequency tables in there).
MAX_METADATA_VALUE_CHARS = 4096

FAMILY_LABELS = {
    "sd": "Stable Diffusion 1.x/2.x",
    "sdxl": "SDXL",
    "flux1": "FLUX.1",
    "flux2": "FLUX.2",
    "flux": "FLUX",
    "unknown": "unknown",
}
#: Cross-attention widths of the real SD families.
_SD_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}

# The "down" (A) matrix of one adapted layer, in the formats diffusers reads.
_DOWN_WEIGHT = re.compile(r"(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")
_CROSS_ATTN_K = re.compile(r"attn2[._]to_k[._](?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")


# A second text encoder, or kohya's SGM block names, only exist in SDXL LoRAs.
_SDXL_MARKERS = (
    "text_encoder_2.",
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks",
    "lora_unet_middle_block",
    "lora_unet_output_blocks",
    "add_embedding",
)
_SD_MARKERS = ("unet.", "text_encoder.", "lora_unet_", "lora_te_", "down_blocks", "up_blocks")


class NotSafetensorsError(ValueError):
    """The file is not a readable safetensors file."""


@dataclass(frozen=True)
class LoraFamily:
    """The model family a LoRA fits, as far as its tensor names and shapes tell."""

    family: str
    #: The UNet cross-attention width it was trained for (SD families); None when not told.
    cross_attention_dim: int | None = None

    @property
    def label(self) -> str:
        width = self.cross_attention_dim
        if self.family == "sd" and width is not None and width in _SD_WIDTHS:
            return _SD_WIDTHS[width]
        label = FAMILY_LABELS.get(self.family, self.family)
        if self.cross_attention_dim is not None and self.cross_attention_dim not in _SD_WIDTHS:
            label += f" (cross-attention {self.cross_attention_dim})"
        return label

    def fits(self, model: LoraFamily) -> bool | None:
        """True or False when the names tell; None when one side is unknown (loading decides)."""
        if self.family == "unknown" or model.family == "unknown":
            return None
        if self.family == "flux" or model.family == "flux":
            # FLUX, version not told: a FLUX model may take it (loading decides), another may not.
            return None if self.family.startswith("flux") and model.family.startswith("flux") else False
        if self.family != model.family:
            return False
        if self.cross_attention_dim is not None and model.cross_attention_dim is not None:
            return self.cross_attention_dim == model.cross_attention_dim
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "label": self.label, "cross_attention_dim": self.cross_attention_dim}


@dataclass(frozen=True)
class LoraHeader:
    family: LoraFamily
    #: Adapted layers (one down/A matrix each): what a complete load must inject.
    layers: int
    tensors: int
    metadata: dict[str, str]


def read_header(file: BinaryIO) -> dict[str, Any]:
    """The JSON header of a safetensors file. NotSafetensorsError for anything else (a pickle, a
    truncated or oversized header)."""
    prefix = file.read(8)
    if len(prefix) != 8:
        raise NotSafetensorsError("too short to be a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise NotSafetensorsError("not a safetensors file (bad header length)")
    raw = file.read(length)
    if len(raw) != length:
        raise NotSafetensorsError("truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise NotSafetensorsError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("not a safetensors file (header is not an object)")
    return header


def describe(path: Path) -> LoraHeader:
    """Read a LoRA file's header and tell its family."""
    with open(path, "rb") as file:
        header = read_header(file)
    raw_metadata = header.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if isinstance(raw_metadata, dict):
        for key, value in raw_metadata.items():
            if isinstance(key, str) and isinstance(value, str):
                metadata[key] = value[:MAX_METADATA_VALUE_CHARS]
    names = [name for name in header if isinstance(name, str)]
    return LoraHeader(
        family=family_of(names, header),
        layers=sum(1 for name in names if _DOWN_WEIGHT.search(name)),
        tensors=len(names),
        metadata=metadata,
    )


def _cross_attention_dim(header: dict[str, Any], names: list[str]) -> int | None:
    for name in names:
        if _CROSS_ATTN_K.search(name):
            shape = header[name].get("shape") if isinstance(header[name], dict) else None
            if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int):
                return shape[1]
    return None


def family_of(names: list[str], header: dict[str, Any] | None = None) -> LoraFamily:
    """The family from tensor names (and, with the header, the cross-attention width)."""
    joined = "\n".join(names)
    if "to_qkv_mlp_proj" in joined or ".ff.linear_in." in joined or ".ff_context.linear_in." in joined:
        return LoraFamily("flux2")
    flux1 = "single_transformer_blocks" in joined or ("transformer_blocks" in joined and "ff.net.0.proj" in joined)
    if flux1 and "unet." not in joined and "down_blocks" not in joined:
        return LoraFamily("flux1")
    if "double_blocks" in joined or "single_blocks" in joined:
        return LoraFamily("flux")
    width = _cross_attention_dim(header, names) if header is not None else None
    if any(marker in joined for marker in _SDXL_MARKERS) or width == 2048:
        return LoraFamily("sdxl", width)
    if any(marker in joined for marker in _SD_MARKERS):
        return LoraFamily("sd", width)
    return LoraFamily("unknown")
