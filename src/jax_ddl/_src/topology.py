"""Topology specs: which grid the ranks of a reduction form (see ../shared DDL notes)."""

from __future__ import annotations

import math
import os
import warnings

import jax

from jax_ddl import _ddl


def parse(spec, *, source: str = "topology") -> tuple[int, ...]:
    """Parses "4x2", 8, or (4, 2) into a tuple of positive ints.

    Raises:
      ValueError: naming `source`, the given value and the expected form.
    """
    if isinstance(spec, bool):
        raise TypeError(
            f"{source} must be a string like '4x2', an int or a tuple of ints; got {spec!r}"
        )
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (tuple, list)):
        if not spec or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in spec
        ):
            raise ValueError(f"{source} must be a non-empty tuple of positive ints; got {spec!r}")
        return tuple(int(d) for d in spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"{source} must be a string like '4x2', an int or a tuple of ints; got {spec!r}"
        )
    try:
        return tuple(_ddl.parse_topology(spec))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def format(dims) -> str:  # noqa: A001 - mirrors parse()
    return "x".join(str(d) for d in dims)


def default_dims(size: int) -> tuple[int, ...]:
    """DDL's hierarchy when the axis covers every device of every process: local devices,
    then processes per host, then hosts (host dimension only when jax_ddl.distributed found
    several hosts, each with consecutive ranks); dimensions of 1 left out. Else flat. The
    cost model's default grid for this launch's placement, so the two never differ."""
    from jax_ddl._src import model

    return model.default_grid(placement(size))


AUTO = "auto"
_warned: set = set()


def placement(size: int):
    """The model's placement of a reduction over `size` ranks: hosts x processes per host
    x devices per process when it covers every device of every process (hosts as
    jax_ddl.distributed found them), else `size` devices of one process."""
    from jax_ddl._src import model

    local, procs = jax.local_device_count(), jax.process_count()
    if procs == 1 or local * procs != size:
        return model.Placement(1, 1, size)
    from jax_ddl._src import distributed

    lay = distributed.layout() or {}
    hosts, per_host = lay.get("hosts", 1), lay.get("processes_per_host", procs)
    if not (hosts > 1 and lay.get("hosts_contiguous")):
        hosts, per_host = 1, procs
    return model.Placement(hosts, per_host, local)


def choose(size: int, nbytes: int, dtype: str, inplace: bool, chunk: int, small: int):
    """topology="auto": the grid the cost model picks for `nbytes` per device (profile:
    JAX_DDL_PROFILE, else the built-in default; every process must use the same one, or
    they pick different grids and fail at the handshake)."""
    from jax_ddl._src import model

    where = placement(size)
    profile = model.profile_from_env()
    if profile.placement is not None and profile.placement != where:
        key = (profile.meta.get("path"), where)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"jax_ddl topology='auto': the profile {profile.meta.get('path')} was measured "
                f"on {profile.placement.label()} (hosts x processes x devices), this call runs "
                f"on {where.label()}; calibrate in this launch for terms that hold here",
                stacklevel=4,
            )
    return tuple(
        model.choose(
            nbytes,
            where,
            profile,
            dtype=dtype,
            inplace=inplace,
            chunk_bytes=chunk,
            small_bytes=small,
        )
    )


def resolve(topology, size: int, api: str, axes: tuple):
    """The grid for a reduction over `axes` spanning `size` ranks, or AUTO (the caller
    picks per call with choose(), once it knows the bytes).

    Order of precedence: the `topology=` argument, then JAX_DDL_TOPOLOGY, then the default.
    """
    if topology is not None:
        source = f"{api}: topology"
        if isinstance(topology, str) and topology.strip().lower() == AUTO:
            return AUTO
        dims = parse(topology, source=source)
    elif os.environ.get("JAX_DDL_TOPOLOGY"):
        source = f"{api}: JAX_DDL_TOPOLOGY"
        if os.environ["JAX_DDL_TOPOLOGY"].strip().lower() == AUTO:
            return AUTO
        dims = parse(os.environ["JAX_DDL_TOPOLOGY"], source=source)
    else:
        return default_dims(size)
    if math.prod(dims) != size:
        raise ValueError(
            f"{source}={format(dims)!r} multiplies to {math.prod(dims)}, but axis_name "
            f"{axes!r} spans {size} devices; give dimensions that multiply to {size} "
            f"(for example {size!r} for a flat ring)."
        )
    return dims
