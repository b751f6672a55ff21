"""Every JAX-version-sensitive import and internal used by jax_ddl lives here.

Verified against jax 0.10.x. Later versions are supported by adding branches here only.
"""

from __future__ import annotations

import jax
from jax._src import config as _config
from jax._src import core as _core
from jax.extend.core import Primitive  # noqa: F401  (re-exported)
from jax.interpreters import ad, batching, mlir  # noqa: F401  (re-exported)

Zero = ad.Zero
is_undefined_primal = ad.is_undefined_primal
instantiate_zeros = ad.instantiate_zeros


def check_vma_enabled() -> bool:
    """True inside a shard_map traced with check_vma=True."""
    return bool(_config._check_vma.value)


def vma(aval) -> frozenset:
    """Mesh axes over which a value varies (empty when vma is not tracked)."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def with_vma(aval, axes: frozenset):
    """`aval` with its varying mesh axes replaced by `axes`."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return aval.update(manual_axis_type=mat.update(varying=frozenset(axes)))
    return aval.update(vma=frozenset(axes))


def pvary(x, axes: tuple):
    """Invariant -> varying no-op cast over `axes` (identity without check_vma)."""
    if not axes:
        return x
    return jax.lax.pcast(x, tuple(axes), to="varying")


def manual_axes() -> tuple:
    """Names of the manual (shard_map / pmap) mesh axes in scope, in mesh order."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(mesh.manual_axes)


def automatic_axes() -> tuple:
    """Mesh axes of size > 1 in scope that are not manual (a partially manual shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    manual = set(mesh.manual_axes)
    return tuple(a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1)


def mesh_axis_sizes() -> dict:
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def bound_axis_names() -> tuple:
    """Every named axis in scope: mesh axes and vmap axis names."""
    return tuple(_core.get_axis_env().axis_names())


def axis_bound(name) -> bool:
    return bool(_core.get_axis_env().axis_exists(name))


def named_axis_effects(axes):
    return {_core.NamedAxisEffect(a) for a in axes}


def is_tracer(x) -> bool:
    return isinstance(x, _core.Tracer)


def lowering_mesh(ctx):
    """The concrete mesh (with devices) a shard_map is being lowered for, or None."""
    mesh = getattr(getattr(ctx.module_context, "axis_context", None), "mesh", None)
    return mesh if getattr(mesh, "devices", None) is not None else None
