"""Benchmarks of mnemo, run from the repo root as `python -m bench.<name>`; results go to bench/results/."""
