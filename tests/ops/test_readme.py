"""The README's curl examples, run as written (real curl, real bash) against a service started like
`make demo` (the settings are read from the Makefile's DEMO_ENV), with their sample answers compared.

Only what a reader cannot copy is replaced: the host and port, the job id placeholder `9c1e...` (by the
id the README's own submit example returned) and the example file name (by a file the service stored).
Every answer must be a success (or the documented 409 of cancelling a finished job), and the answers
the README shows must match what the demo returns: same fields, same types, same values where the
sample's value is not an id or a time.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import SERVE, ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
JOB_PLACEHOLDER = "9c1e..."
IMAGE_PLACEHOLDER = "20261127-055553-566412ab03ff.png"
#: Sample fields whose values are ids, names or times: only their type is compared.
VARYING = {"id", "request_id", "filename", "url", "b64", "status_url", "events_url", "queued_ms", "generation_ms"}
VARYING |= {"total_ms", "prompt", "seeds"}
#: Each example may take this long (the demo model: about 2 s for 512x512 and 25 steps on an idle CPU).
SECONDS_PER_EXAMPLE = 60

pytestmark = pytest.mark.slow


def demo_env() -> dict[str, str]:
    match = re.search(r"^DEMO_ENV := (.*)$", MAKEFILE, re.M)
    assert match, "the Makefile has no DEMO_ENV"
    return dict(item.split("=", 1) for item in shlex.split(match.group(1)))


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def shell_commands(block: str) -> list[str]:
    """The block's commands: lines joined while a quote is open or a line ends in a backslash."""
    commands: list[str] = []
    current = ""
    for line in block.splitlines():
        current = f"{current}\n{line}" if current else line
        if current.rstrip().endswith("\\") or current.count("'") % 2:
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current)
        current = ""
    return commands


def readme_curls() -> list[str]:
    return [
        command
        for block in bash_blocks(README)
        for command in shell_commands(block)
        if command.startswith("curl ") and re.search(r"//(localhost|127\.0\.0\.1):7860", command)
    ]


def test_the_readme_examples_are_found() -> None:
    curls = readme_curls()
    assert len(curls) >= 25, curls
    assert any('\'{\n  "prompt": "a lighthouse at dawn' in command for command in curls)  # the multi-line one


def matches(sample: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from the README's sample (a "..." key or value stands for anything)."""
    if isinstance(sample, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {type(actual).__name__}, not an object"]
        problems = []
        for key, value in sample.items():
            if key == "...":
                continue
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            elif key not in VARYING:
                problems += matches(value, actual[key], f"{path}.{key}")
            elif actual[key] is not None and not isinstance(actual[key], type(value)):
                problems.append(f"{path}.{key}: {type(actual[key]).__name__}, not {type(value).__name__}")
        return problems
    if isinstance(sample, list):
        if not isinstance(actual, list) or len(actual) != len(sample):
            return [f"{path}: {actual!r} is not a list of {len(sample)}"]
        return [
            problem for index, item in enumerate(sample) for problem in matches(item, actual[index], f"{path}[{index}]")
        ]
    if isinstance(sample, str) and sample.endswith("..."):
        return [] if isinstance(actual, str) and actual.startswith(sample[:-3]) else [f"{path}: {actual!r}"]
    if isinstance(sample, float) and isinstance(actual, (int, float)):
        return []  # a measured figure
    return [] if sample == actual else [f"{path}: {actual!r}, the README shows {sample!r}"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`make demo`'s service (its settings from the Makefile), in its own folder."""
    folder = tmp_path_factory.mktemp("demo")
    with ServiceProcess(folder, command=SERVE, ready_timeout=300, **demo_env()) as service:
        yield service


def run_example(command: str, port: int, folder: Path) -> tuple[int, str, list[int], float]:
    """(exit status, stdout, HTTP statuses of its curl calls, seconds) of one example, run by bash."""
    local = re.sub(r"//(localhost|127\.0\.0\.1):7860", f"//127.0.0.1:{port}", command)
    # curl reports each answer's status on stderr; the example's own output is untouched.
    prelude = "curl() { command curl -w '%{stderr}HTTPSTATUS=%{http_code}\\n' \"$@\"; }\n"
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "-c", prelude + local],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=SECONDS_PER_EXAMPLE * 3,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "KEY": "", "HOME": str(folder)},
    )
    seconds = time.perf_counter() - started
    statuses = [int(value) for value in re.findall(r"HTTPSTATUS=(\d+)", done.stderr)]
    return done.returncode, done.stdout, statuses, seconds


def json_samples() -> dict[str, Any]:
    """The README's sample answers: the txt2img answer (the first JSON block after the txt2img example)
    and the job submit answer (the `# -> {...}` line)."""
    txt2img_at = README.index("### Generate (synchronous)")
    block = re.search(r"^```json\n(.*?)^```", README[txt2img_at:], re.M | re.S)
    submitted = re.search(r"^# -> (\{.*\})$", README, re.M)
    assert block and submitted
    return {"txt2img": json.loads(block.group(1)), "submit": json.loads(submitted.group(1))}


def test_every_readme_example_runs_as_written_against_the_demo(demo: ServiceProcess, tmp_path: Path) -> None:
    samples = json_samples()
    job_id = image_name = None
    report: list[str] = []
    for command in readme_curls():
        if JOB_PLACEHOLDER in command:
            assert job_id, "the README uses a job id before its submit example"
            command = command.replace(JOB_PLACEHOLDER, job_id)
        if IMAGE_PLACEHOLDER in command:
            if image_name is None:  # the newest stored image (the README's earlier examples made several)
                image_name = demo.client.get("/api/images", params={"limit": 1}).json()["images"][0]["name"]
            command = command.replace(IMAGE_PLACEHOLDER, image_name)
        code, output, statuses, seconds = run_example(command, demo.port, tmp_path)
        first_line = command.splitlines()[0]
        report.append(f"{seconds:6.2f} s  {statuses}  {first_line[:110]}")
        assert code == 0, f"{first_line}: exit {code}"
        assert statuses, first_line
        cancelling = command.rstrip().split("#")[0].strip().endswith("/cancel")
        for status in statuses:
            assert status < 400 or (cancelling and status == 409), f"{first_line}: HTTP {status}\n{output[:500]}"
        assert seconds < SECONDS_PER_EXAMPLE, f"{first_line}: {seconds:.1f} s"

        if '"prompt": "a castle"' in command:  # the submit example: its answer, and the id later lines use
            answer = json.loads(output)
            assert matches(samples["submit"], answer) == [], matches(samples["submit"], answer)
            job_id = answer["id"]
        if '"prompt": "a lighthouse at dawn, oil painting"' in command:  # the documented txt2img answer
            answer = json.loads(output)
            assert matches(samples["txt2img"], answer) == [], matches(samples["txt2img"], answer)
        if "-o fox.png" in command:
            assert (tmp_path / "fox.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if "-o image.png" in command:
            assert (tmp_path / "image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("\n".join(report))
    assert job_id is not None and image_name is not None


def test_the_first_example_prints_what_the_readme_says(demo: ServiceProcess, tmp_path: Path) -> None:
    """`make demo`'s own hint and the README's first example: a JSON answer from tiny-sd-512 at 512x512."""
    first = readme_curls()[0]
    assert "a red fox in the snow" in first and "| head -30" in first
    code, output, statuses, _ = run_example(first, demo.port, tmp_path)
    assert code == 0 and statuses == [200]
    assert output.startswith("{") and '"backend": "sd"' in output and '"model": "tiny-sd-512"' in output
    body = demo.client.get("/api/images", params={"limit": 1}).json()["images"][0]["metadata"]
    assert (body["width"], body["height"], body["seed"]) == (512, 512, 42)
