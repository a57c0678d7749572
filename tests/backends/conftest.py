"""Fixtures of the local backend tests (sd, flux-local): special tiny model folders, built once per
session by the same builders as the built-in tiny models (backends/local/tiny_models.py), with the
option a test needs, loaded through the ordinary local-folder path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagegen.backends.local import tiny_models


@pytest.fixture(scope="session")
def build_fixture_model(model_dir: Path) -> Callable[..., Path]:
    """build(name, builder, **options) -> folder, built once per session under model_dir/fixtures."""

    def build(name: str, builder: Callable[..., None], **options: Any) -> Path:
        target = model_dir / "fixtures" / name
        if not (target / tiny_models.COMPLETE_MARKER).exists():
            tiny_models.build(lambda folder: builder(folder, **options), target)
        return target

    return build


@pytest.fixture(scope="session")
def tiny_checker(build_fixture_model: Callable[..., Path]) -> Path:
    """A never-flagging tiny safety checker, for fixture models that are not built-ins (a folder
    model is paired with SD_SAFETY_CHECKER_ID, which by default names a hub repository)."""
    return build_fixture_model("checker", tiny_models.build_tiny_safety_checker)


@pytest.fixture(scope="session")
def flag_all_checker(build_fixture_model: Callable[..., Path]) -> Path:
    return build_fixture_model("checker-flag-all", tiny_models.build_tiny_safety_checker, flag_all=True)
