"""What flux-local derives from a model's configs, and its settings (no torch needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.backends.local.flux_local import profile_for
from imagegen.config import Settings, SettingsError, load_settings
from imagegen.errors import BackendUnavailableError


def test_klein_profiles_follow_is_distilled() -> None:
    distilled = profile_for(
        "black-forest-labs/FLUX.2-klein-4B", {"_class_name": "Flux2KleinPipeline", "is_distilled": True}, None, None
    )
    assert (distilled.guidance, distilled.default_steps, distilled.default_guidance) == ("none", 4, None)
    base = profile_for(
        "black-forest-labs/FLUX.2-klein-base-4B",
        {"_class_name": "Flux2KleinPipeline", "is_distilled": False},
        None,
        None,
    )
    assert (base.guidance, base.default_steps, base.default_guidance) == ("cfg", 50, 4.0)


def test_flux1_profiles_follow_guidance_embeds() -> None:
    index = {"_class_name": "FluxPipeline"}
    schnell = profile_for("some/folder", index, {"guidance_embeds": False}, {"sample_size": 1024})
    assert (schnell.variant, schnell.guidance, schnell.default_steps, schnell.max_sequence_length) == (
        "flux1-schnell",
        "none",
        4,
        256,
    )
    dev = profile_for("some/folder", index, {"guidance_embeds": True}, None)
    assert (dev.variant, dev.guidance, dev.default_guidance, dev.max_sequence_length) == (
        "flux1-dev",
        "embedded",
        3.5,
        512,
    )


def test_before_the_first_download_the_repository_name_decides() -> None:
    assert profile_for("black-forest-labs/FLUX.2-klein-4B", None, None, None).variant == "flux2-klein"
    assert profile_for("black-forest-labs/FLUX.2-klein-base-4B", None, None, None).variant == "flux2-klein-base"
    assert profile_for("black-forest-labs/FLUX.1-schnell", None, None, None).variant == "flux1-schnell"
    assert profile_for("black-forest-labs/FLUX.1-dev", None, None, None).variant == "flux1-dev"
    assert profile_for("black-forest-labs/FLUX.1-dev", None, None, None).native_size == 1024


def test_other_pipelines_are_refused_by_name() -> None:
    with pytest.raises(BackendUnavailableError, match=r"StableDiffusionXLPipeline.*sd backend"):
        profile_for("x/y", {"_class_name": "StableDiffusionXLPipeline"}, None, None)


def test_float16_is_not_a_flux_dtype() -> None:
    with pytest.raises(SettingsError, match="SD_FLUX_DTYPE"):
        load_settings(_env_file=None, flux_dtype="float16")
    assert Settings(_env_file=None).flux_model_id == "black-forest-labs/FLUX.2-klein-4B"


def test_flux_local_answers_capabilities_and_health_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from imagegen.config import Settings\n"
        "from imagegen.backends.registry import BackendRegistry\n"
        f"s = Settings(_env_file=None, model_dir=r'{tmp_path}/m', output_dir=r'{tmp_path}/o', data_dir=r'{tmp_path}/d')\n"
        "flux = BackendRegistry.from_settings(s).get('flux-local')\n"
        "flux.capabilities(); flux.health().to_dict(); flux.info()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
