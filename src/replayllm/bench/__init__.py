"""Benchmarks that users of other engines know how to read (`replayllm bench`), and the per-token profiler."""
