"""Test setup: 8 host CPU devices (set before jax is imported) and x64 for int64/float64."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_ENABLE_X64", "1")

import pytest  # noqa: E402

from jax_ddl import _ddl  # noqa: E402


@pytest.fixture(autouse=True)
def _no_faults():
    """Every test starts and ends with the test-only fault switch off."""
    _ddl.set_fault("none", -1)
    yield
    _ddl.set_fault("none", -1)
