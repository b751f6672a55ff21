"""Shared helpers for the tests (importable because tests/ is on sys.path)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

# jax 0.11.x crashes (SIGSEGV in Shardy's ManualComputationUnusedInputsPattern while
# compiling) on a shard_map whose pytree input mixes zero-size and other leaves; the same
# program with jax.lax.psum alone crashes too. jax 0.10 and 0.12 compile it. Tests leave
# zero-size leaves out of multi-leaf trees on 0.11 only.
ZERO_SIZE_LEAVES_OK = jax.__version_info__[:2] != (0, 11)


def mesh_of(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def spmd(fn, mesh, in_specs, out_specs, check_vma=True):
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    )


def int_valued(shape, dtype, seed=0, low=-8, high=8):
    """Integer-valued data, so sums are exact in every supported dtype."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(low, high, size=shape), dtype=dtype)


def count_ddl_calls(fn, *args):
    """Number of ddl_allreduce equations in the jaxpr of fn(*args), at any depth."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return str(jaxpr).count("ddl_allreduce")


def settled_counter(name, expected, timeout=10.0):
    """The counter once it reaches `expected` (device threads still failing when the first
    error surfaces in Python finish shortly after), or its value after `timeout`."""
    import jax_ddl

    deadline = time.monotonic() + timeout
    while jax_ddl.counters()[name] < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a value past `expected` would show up here
    return jax_ddl.counters()[name]
