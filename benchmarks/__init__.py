"""Reproducible benchmarks: `python -m benchmarks embedded` (see README.md)."""
