"""Benchmarks whose figures go into docs/BENCHMARKS.md (`ola bench ...`). They may import pipeline and trainer both."""
