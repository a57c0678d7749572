"""Benchmarks: each bench/bench_*.py module has `run() -> list[dict]`; `python -m bench` runs them all
and prints one table of figures measured side by side in one run (ratios, not absolute times)."""
