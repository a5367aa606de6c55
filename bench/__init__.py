"""Benchmarks: `python -m bench.heatmap`, `python -m bench.train` (add `--quick`)."""
