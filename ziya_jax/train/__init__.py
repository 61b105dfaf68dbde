"""Training: losses, stages, optimizer, checkpoints and the loop (`python -m ziya_jax.train`)."""
