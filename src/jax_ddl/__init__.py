"""jax_ddl: IBM DDL's topology-aware allreduce for JAX, as an XLA FFI custom call."""

from jax_ddl._src.buckets import sync_gradients
from jax_ddl._src.collectives import (
    counters,
    pmax,
    pmean,
    pmin,
    psum,
    reset_counters,
    supported_platforms,
)
from jax_ddl._src.model import explain_launch as explain
from jax_ddl._src.trace import trace

__all__ = [
    "psum",
    "explain",
    "pmean",
    "pmax",
    "pmin",
    "sync_gradients",
    "counters",
    "reset_counters",
    "supported_platforms",
    "trace",
]
__version__ = "0.1.0"
