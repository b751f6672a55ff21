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


_SITES_KEY = ("jax_ddl", "call sites")  # our entry in a module's lowering cache
_modules_named: dict = {}  # module name -> modules of that name lowered with jax_ddl calls


def call_site(ctx) -> tuple[int, int, str]:
    """(module, site, name) for a jax_ddl call being lowered.

    `site` numbers the jax_ddl calls of one module in lowering order (1, 2, ...), so it
    depends on the program alone and every process derives the same one; `name` is the
    module's name; `module` tells this process's lowered modules of that name apart (how
    many such modules it lowered before), so the compiled program is the same text in
    every process unless one lowered extra modules of the same name. The count lives in
    the module context's lowering cache, which every sub-context shares.
    """
    mod_ctx = ctx.module_context
    try:
        name = str(mod_ctx.module.operation.attributes["sym_name"]).strip('"')
    except (KeyError, AttributeError):
        name = "a jitted function"
    store = mod_ctx.cached_primitive_lowerings
    record = store.get(_SITES_KEY)
    if record is None:
        number = _modules_named.get(name, 0)
        _modules_named[name] = number + 1
        record = store[_SITES_KEY] = [number, 0]
    record[1] += 1
    return record[0], record[1], name


def register_state_type(name: str, registration: dict, platform: str) -> None:
    """Registers an FFI state type so that it exists before the handlers that use it.

    jaxlib defers both registrations until the backend starts and then registers the
    handlers first, which fails for a handler with an instantiate stage ("Types used by FFI
    handlers must be registered before the handler registration"). The type registry is
    process-wide, so installing jaxlib's own type handler now registers the type at once.
    """
    from jaxlib import xla_client

    if platform == "cpu":
        xla_client.register_custom_type_handler("cpu", xla_client._xla.register_custom_type)
    jax.ffi.register_ffi_type(name, registration, platform=platform)
