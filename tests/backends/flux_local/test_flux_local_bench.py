"""bench/gpu_flux.py is meant for a GPU machine; here it must at least parse its arguments and
run its whole path (both timers, the service backend) with tiny shapes on CPU."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from bench import gpu_flux


def test_arguments_and_refusals() -> None:
    args = gpu_flux.parse_args([])
    assert (args.size, args.steps, args.dry_run) == (1024, [4, 12], False)
    assert gpu_flux.KLEIN_4B_TRANSFORMER["joint_attention_dim"] == 3 * 2560  # Qwen3-4B hidden x 3 layers
    for bad in (["--size", "1000"], ["--steps", "4", "4"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_flux.parse_args(bad)
        assert exit_info.value.code == 2


def test_dry_run_prints_one_json_line() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert gpu_flux.main(["--dry-run", "--repeats", "1"]) == 0
    (line,) = out.getvalue().strip().splitlines()
    result = json.loads(line)
    assert result["dry_run"] is True and result["device"] == "cpu" and result["size"] == 64
    assert result["service_errors"] == []
    assert {"plain_it_per_s", "service_it_per_s", "plain_peak_gib", "service_peak_gib"} <= result.keys()
