"""The operator documentation stays complete: every setting is in the README and in .env.example,
and .env.example itself loads to the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [f"SD_{name.upper()}" for name in Settings.model_fields]


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    missing = [name for name in SETTINGS if name not in text]
    assert missing == []


def test_env_example_loads_to_the_defaults() -> None:
    from_example = Settings(_env_file=ROOT / ".env.example")
    defaults = Settings(_env_file=None)
    assert from_example.model_dump() == defaults.model_dump()


def test_readme_shows_the_two_commands_and_the_start_commands() -> None:
    text = (ROOT / "README.md").read_text()
    for command in ("make demo", "make test", "imagegen serve", "uvicorn imagegen.main:app --host 0.0.0.0 --port 7860"):
        assert command in text


def test_code_cites_documents_of_this_repository_only() -> None:
    """A docstring or comment may point at docs/...; never at a path that exists only on some machine."""
    outside = ("/work/", "shared/", "reference/", "seed/stable-diffusion", "DESIGN.md")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", "tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(marker in line for marker in outside) and path.name != "test_docs.py"
    ]
    assert found == []
