"""Benchmarks against peers, run as `python -m ziya_jax.bench NAME`; each prints measured ratios from one run."""
