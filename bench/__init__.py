"""Benchmarks and small reproductions (bench/README in docs/performance.md and docs/results.md)."""
