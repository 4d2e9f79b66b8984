"""pytest-benchmark suite of dino_fast: `pytest benchmarks --benchmark-only`."""
