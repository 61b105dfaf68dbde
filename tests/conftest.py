import os

# Multi-device code is tested on forced host devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same tiny programs; a per-run persistent cache compiles each once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ziya-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
