"""Test setup: 8 emulated CPU devices and the persistent compilation cache.

Both must be configured before jax is imported anywhere, which is why this happens at the
top of conftest.py (pytest imports it before any test module).
"""

import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} devices"
