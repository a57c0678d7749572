"""The LoRA folder without torch: safetensors headers, the family told from tensor names (diffusers
and kohya naming, as real LoRAs come), and lookups that never leave the folder."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from imagegen.errors import InvalidParameterError
from imagegen.storage.lora_format import LoraFamily, NotSafetensorsError, describe, family_of
from imagegen.storage.loras import LoraCatalog


def write_safetensors(path: Path, shapes: dict[str, list[int]], metadata: dict[str, str] | None = None) -> None:
    """A real safetensors file (header + zero bytes), written by hand: no torch needed."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


KOHYA_SD15 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 768],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": [320, 4],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": [],
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 768],
}
KOHYA_SD2 = {"lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [8, 1024]}
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 2048],
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 768],
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [4, 1280],
}
DIFFUSERS_SDXL = {"unet.down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.lora_A.weight": [4, 2048]}
FLUX1 = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": [16, 3072]}
FLUX2 = {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": [16, 3072]}
BFL = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": [16, 3072]}


@pytest.mark.parametrize(
    ("shapes", "family", "width", "label"),
    [
        (KOHYA_SD15, "sd", 768, "SD 1.x"),
        (KOHYA_SD2, "sd", 1024, "SD 2.x"),
        (KOHYA_SDXL, "sdxl", 2048, "SDXL"),
        (DIFFUSERS_SDXL, "sdxl", 2048, "SDXL"),
        (FLUX1, "flux1", None, "FLUX.1"),
        (FLUX2, "flux2", None, "FLUX.2"),
        (BFL, "flux", None, "FLUX"),
        ({"prior.blocks.0.to_q.lora_A.weight": [4, 8]}, "unknown", None, "unknown"),
    ],
)
def test_the_family_comes_from_the_names_and_the_cross_attention_width(
    tmp_path: Path, shapes: dict[str, list[int]], family: str, width: int | None, label: str
) -> None:
    write_safetensors(tmp_path / "x.safetensors", shapes, {"ss_output_name": "x"})
    header = describe(tmp_path / "x.safetensors")
    assert (header.family.family, header.family.cross_attention_dim, header.family.label) == (family, width, label)
    assert header.metadata == {"ss_output_name": "x"}
    assert header.layers == sum(1 for name in shapes if "lora_down" in name or "lora_A" in name)


def test_what_fits_what() -> None:
    sd15, sd2 = LoraFamily("sd", 768), LoraFamily("sd", 1024)
    assert sd15.fits(LoraFamily("sd", 768)) is True and sd15.fits(sd2) is False
    assert sd15.fits(LoraFamily("sd")) is True  # the model's width not known: the family decides
    assert LoraFamily("sdxl", 2048).fits(sd15) is False and sd15.fits(LoraFamily("flux2")) is False
    assert LoraFamily("flux").fits(LoraFamily("flux1")) is None and LoraFamily("flux").fits(sd15) is False
    assert LoraFamily("unknown").fits(sd15) is None and sd15.fits(LoraFamily("unknown")) is None
    assert family_of(["text_encoder_2.text_model.encoder.layers.0.q_proj.lora_A.weight"]).family == "sdxl"


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04\x95 pickled", struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 5) + b"[1,2]", b"\x00" * 8],
)
def test_anything_but_safetensors_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(NotSafetensorsError):
        describe(tmp_path / "bad.safetensors")
    catalog = LoraCatalog(tmp_path)
    assert catalog.list() == []
    with pytest.raises(InvalidParameterError, match="not a safetensors file"):
        catalog.get("bad")


def test_names_are_looked_up_in_the_folder_only(tmp_path: Path) -> None:
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    write_safetensors(folder / "style one.safetensors", KOHYA_SD15)
    write_safetensors(outside / "secret.safetensors", KOHYA_SD15)
    (folder / "sub").mkdir()
    write_safetensors(folder / "sub" / "nested.safetensors", KOHYA_SD15)
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")
    os.symlink(folder / "style one.safetensors", folder / "alias.safetensors")
    os.symlink(folder / "missing.safetensors", folder / "dangling.safetensors")
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    os.symlink(outside, folder / "dir.safetensors")
    (folder / "weights.ckpt").write_bytes(b"\x80\x04")
    catalog = LoraCatalog(folder)
    assert [entry.name for entry in catalog.list()] == ["alias", "style one"]
    assert catalog.get("alias").path == (folder / "style one.safetensors").resolve()
    assert catalog.get("style one").header.family.label == "SD 1.x"
    for name in ("escape", "dangling", "loop", "dir", "weights", "sub/nested", "../elsewhere/secret", "nested"):
        with pytest.raises(InvalidParameterError) as caught:
            catalog.get(name)
        assert caught.value.param == "loras" and name not in caught.value.message
    for name in ("", ".hidden", "a\x00b", " padded", "a:b", "<x>", "a" * 201):
        with pytest.raises(InvalidParameterError):
            catalog.get(name)
    assert LoraCatalog(tmp_path / "does-not-exist").list() == []


def test_hashes_are_computed_once_per_file_version(tmp_path: Path) -> None:
    import hashlib

    write_safetensors(tmp_path / "a.safetensors", KOHYA_SD15)
    catalog = LoraCatalog(tmp_path)
    entry = catalog.get("a")
    assert catalog.sha256(entry) == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    write_safetensors(tmp_path / "a.safetensors", KOHYA_SDXL)  # replaced: a new version
    os.utime(tmp_path / "a.safetensors", ns=(entry.mtime_ns + 10**9, entry.mtime_ns + 10**9))
    replaced = catalog.get("a")
    assert replaced.version != entry.version and replaced.header.family.family == "sdxl"
    assert catalog.sha256(replaced) == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
