"""Multi-process start-up: `jax_ddl.distributed.initialize()` under mpiexec."""

from jax_ddl._src.distributed import initialize, launched_by_mpiexec, layout

__all__ = ["initialize", "launched_by_mpiexec", "layout"]
