"""Imports run one way: down the layers of tests/support/layers.py (ground, storage, backends, engine,
services, api, app), and no two modules import each other, round a loop or directly. Lazy imports
inside functions count; imports only for type checkers are held to the same rules, with one known
exception below. `python -m tests.support.layers` prints the same findings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import layers

ROOT = Path(__file__).resolve().parents[2]


def test_no_import_runs_up_a_layer() -> None:
    found = layers.arrows()
    assert found, "no imports found: is SRC right?"
    runtime = [arrow for arrow in found if not arrow.type_only]
    assert [str(arrow) for arrow in layers.upward(runtime)] == []
    # Type-only imports may not run upward either: they are the same dependency, deferred.
    assert [str(arrow) for arrow in layers.upward(found) if arrow.type_only] == []


def test_no_import_cycles_not_even_for_type_checkers() -> None:
    found = layers.arrows()
    assert layers.cycles(found) == []
    assert layers.mutual(found) == []


def test_every_module_is_in_a_layer() -> None:
    for module in layers.modules():
        layers.layer_of(module)  # raises for a module no layer names


def test_the_checker_sees_lazy_typed_and_relative_imports_and_cycles(tmp_path: Path) -> None:
    """The rules above can fail: a tree with each kind of offence is reported as such."""
    package = tmp_path / "imagegen"
    (package / "engine").mkdir(parents=True)
    (package / "api").mkdir()
    files = {
        "__init__.py": "",
        "config.py": "def f():\n    from imagegen.engine import jobs\n",  # lazy, upward
        "errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from imagegen.api.deps import X\n",
        "engine/__init__.py": "",
        "engine/jobs.py": "from . import store\n",  # relative, same layer
        "engine/store.py": "import imagegen.engine.jobs\n",  # closes a cycle with jobs
        "api/__init__.py": "",
        "api/deps.py": "from imagegen.engine.jobs import Job\nfrom imagegen import errors\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    found = layers.arrows(tmp_path)
    up = {(arrow.source, arrow.target, arrow.type_only) for arrow in layers.upward(found)}
    assert up == {
        ("imagegen.config", "imagegen.engine.jobs", False),
        ("imagegen.errors", "imagegen.api.deps", True),
    }
    assert layers.cycles(found) == [
        ["imagegen.api.deps", "imagegen.errors"],
        ["imagegen.engine.jobs", "imagegen.engine.store"],
    ]
    assert layers.mutual(found) == [
        ("imagegen.api.deps", "imagegen.errors"),
        ("imagegen.engine.jobs", "imagegen.engine.store"),
    ]
    report = "\n".join(layers.report(found))
    assert "upward import arrows: 1" in report and "imagegen.config -> imagegen.engine.jobs" in report


def test_the_script_runs_and_prints_its_findings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.layers"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "upward import arrows: 0" in result.stdout and "import cycles: 0" in result.stdout


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_benchmarks_need_no_pytest() -> None:
    """bench/ starts services with tests/support/process.py: neither it nor anything of tests/ that
    bench reaches imports pytest (a benchmark machine installs no test tools)."""
    seen: set[Path] = set()
    todo = sorted((ROOT / "bench").glob("*.py"))
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        imported = _imported_modules(path)
        assert not {name for name in imported if name.split(".")[0] == "pytest"}, path
        for name in imported:
            if name.split(".")[0] in ("bench", "tests"):
                candidate = ROOT.joinpath(*name.split(".")).with_suffix(".py")
                if candidate.is_file():
                    todo.append(candidate)
    assert ROOT / "tests" / "support" / "process.py" in seen
