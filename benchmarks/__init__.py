"""The benchmark harness of sandbox-proxy: `python -m benchmarks.run` (see README.md here)."""
