"""Shared fixtures: tiny HF models built offline, saved once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops jit caches after each test module. Every compiled CPU executable holds memory mappings,
  and one process of the whole suite reached the kernel's 65530 per process (then LLVM fails to
  allocate and XLA segfaults); a module's executables are not needed by the next one."""
  yield
  jax.clear_caches()
  gc.collect()
