"""jax_ddl.psum / pmean / pmax / pmin: the allreduce primitive and its JAX rules.

One primitive, `ddl_allreduce`, reduces a list of same-dtype arrays over named mesh axes
through the XLA FFI target `jax_ddl_allreduce`. Its rules mirror jax.lax.psum's so the
functions are drop-in replacements: under check_vma the result is invariant over the
reduced axes; the transpose is a no-op cast to varying (check_vma) or another allreduce
(without check_vma, and in pmap); vmap passes batch dimensions through.
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ddl import _ddl
from jax_ddl._src import compat
from jax_ddl._src import topology as _topology
from jax_ddl._src.gate import gate

TARGET = "jax_ddl_allreduce"
OPS = {"sum": 0, "max": 1, "min": 2}
SUPPORTED_DTYPES = tuple(
    np.dtype(d) for d in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int64)
)
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_SMALL_BYTES = 16 * 1024
# Across processes a call is cut into chunks of about this many bytes (of one device's
# buffer) whose stages run as a pipeline: docs/design.md, "Pipelined chunks".
DEFAULT_CHUNK_BYTES = 4 << 20

for _platform, _stages in _ddl.registrations().items():
    # Each call site's state (identity, scratch) lives in an FFI state that XLA creates
    # per compiled instruction and frees with the executable.
    _name = "jax_ddl_site" if _platform == "cpu" else f"jax_ddl_site_{_platform.lower()}"
    compat.register_state_type(_name, _ddl.site_type(_platform), _platform)
    jax.ffi.register_ffi_target(TARGET, _stages, platform=_platform)


def _single_rank_calls() -> bool:
    """Test-only (JAX_DDL_TEST_SINGLE_RANK_CALLS=1): reductions over one rank go through the
    handler too, instead of jax.lax (which XLA removes), so a machine with one GPU can
    exercise the CUDA handler's binding and copy path."""
    return os.environ.get("JAX_DDL_TEST_SINGLE_RANK_CALLS") == "1"


MAX_TIMEOUT_S = 1e7  # about 115 days: longer is a typo, and would overflow the deadline


def timeout_ms() -> int:
    """JAX_DDL_TIMEOUT as milliseconds (-1: no limit), read when a call is traced.

    The value bounds each call as a whole: a rank's call must complete within that many
    seconds of the rank's arrival, or it fails naming the ranks it waited for.
    """
    raw = os.environ.get("JAX_DDL_TIMEOUT")
    if raw is None or raw.strip() == "":
        return int(DEFAULT_TIMEOUT_S * 1000)
    if raw.strip().lower() == "none":
        return -1
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"JAX_DDL_TIMEOUT must be a number of seconds, or 'none' to wait without limit; "
            f"got {raw!r}"
        ) from None
    if not (0 < value <= MAX_TIMEOUT_S):  # also refuses nan
        raise ValueError(
            f"JAX_DDL_TIMEOUT must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], or "
            f"'none' to wait without limit; got {raw!r}"
        )
    return max(1, int(value * 1000))


def _env_bytes(name: str, default: int, note: str = "") -> int:
    """A byte count >= 0 from environment variable `name` (unset or empty: `default`)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer byte count{note}; got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0{note}; got {raw!r}")
    return value


def small_bytes() -> int:
    """JAX_DDL_SMALL_BYTES: per-device messages up to this size take the one-barrier path."""
    return _env_bytes("JAX_DDL_SMALL_BYTES", DEFAULT_SMALL_BYTES)


def chunk_bytes() -> int:
    """JAX_DDL_CHUNK_BYTES: bytes per pipeline chunk across processes; 0 turns it off."""
    return _env_bytes("JAX_DDL_CHUNK_BYTES", DEFAULT_CHUNK_BYTES, " (0: no pipelining)")


# ---------------------------------------------------------------------------------------
# The primitive. Operands: rank (int32), group (int32), then the arrays to reduce.

allreduce_p = compat.Primitive("ddl_allreduce")
allreduce_p.multiple_results = True


def _abstract_eval(
    rank, group, *avals, axes, group_axes, op, grid, timeout, small, chunk, inplace, vma
):
    del rank, group, group_axes, op, grid, timeout, small, chunk, inplace
    if vma:
        outs = [compat.with_vma(a, compat.vma(a) - frozenset(axes)) for a in avals]
    else:
        outs = list(avals)
    return outs, compat.named_axis_effects(axes)


allreduce_p.def_effectful_abstract_eval(_abstract_eval)


def _impl(*args, **params):
    raise ValueError(
        "jax_ddl collectives must be called inside jax.shard_map or jax.pmap, where "
        f"the axes {params['axes']!r} are bound."
    )


allreduce_p.def_impl(_impl)


def _check_device_layout(mesh, axes) -> None:
    """At lowering, with the devices known: each group of ranks must lie inside one process
    (shared memory) or be all devices, process by process (shared memory, then MPI)."""
    if mesh is None or jax.process_count() == 1:
        return
    names = list(mesh.axis_names)
    order = [names.index(a) for a in names if a not in axes] + [names.index(a) for a in axes]
    devs = np.asarray(mesh.devices).transpose(order)
    size = math.prod(mesh.shape[a] for a in axes)
    groups = devs.reshape(-1, size)
    procs = np.vectorize(lambda d: d.process_index)(groups)
    if np.all(procs == procs[:, :1]):
        return  # every group inside one process
    local = jax.local_device_count()
    everything = groups.shape[0] == 1 and size == jax.device_count()
    if everything and np.array_equal(procs[0], np.arange(size) // local):
        return
    where = ", ".join(f"rank {r}: process {p}" for r, p in enumerate(procs[0][: 2 * local]))
    raise NotImplementedError(
        f"jax_ddl: the reduction over {list(axes)} mixes processes in a way jax_ddl does not "
        f"support ({where}, ...). Across processes it reduces over all devices of all "
        f"processes, ordered process by process as jax.devices() is (rank r in process "
        f"r // {local}); build the mesh from jax.devices() in that order."
    )


def _device_ranks(mesh, axes, group_axes) -> np.ndarray:
    """[device id, rank, group, ...] for every device of `mesh`: its index over `axes` (what
    lax.axis_index(axes) gives it) and over `group_axes`, as int64 triples."""
    names = list(mesh.axis_names)
    devs = np.asarray(mesh.devices)
    table = []
    for idx in np.ndindex(devs.shape):
        pos = dict(zip(names, idx))
        rank = group = 0
        for a in axes:
            rank = rank * mesh.shape[a] + pos[a]
        for a in group_axes:
            group = group * mesh.shape[a] + pos[a]
        table += [devs[idx].id, rank, group]
    return np.asarray(table, np.int64)


def _lowering(
    ctx,
    rank,
    group,
    *xs,
    axes,
    group_axes,
    op,
    grid,
    timeout,
    small,
    chunk,
    inplace,
    vma,
    platform,
):
    del vma
    mesh = compat.lowering_mesh(ctx)
    _check_device_layout(mesh, axes)
    aliases = {i + 2: i for i in range(len(xs))} if inplace else None
    # On CPU, with the mesh known, each device's rank and group go in an attribute (looked
    # up by the device id XLA's CPU runtime passes) and the rank operands are constants:
    # computed operands are temporaries whose memory XLA reuses for later work once the
    # call has read them, which makes its executor run that work only after the call
    # completed, so nothing would overlap an asynchronous call (docs/design.md, "Threads").
    table = np.zeros(0, np.int64)
    if platform == "cpu" and mesh is not None and all(a in mesh.shape for a in axes):
        table = _device_ranks(mesh, axes, group_axes)
        rank = group = compat.mlir.ir_constant(np.int32(0))
    # The side effect keeps XLA from removing or merging calls. It does not order them:
    # XLA's CPU executor runs independent calls concurrently and in any order, and the
    # engine pairs them by identity (docs/design.md, "Call identity").
    rule = jax.ffi.ffi_lowering(TARGET, operand_output_aliases=aliases, has_side_effect=True)
    module, site, name = compat.call_site(ctx)
    return rule(
        ctx,
        rank,
        group,
        *xs,
        op=np.int32(OPS[op]),
        dims=np.asarray(grid, np.int64),
        timeout_ms=np.int64(timeout),
        small_bytes=np.int64(small),
        chunk_bytes=np.int64(chunk),
        device_ranks=table,
        module=np.int64(module),
        site=np.int64(site),
        name=name,
    )


def _unsupported_platform(ctx, *args, **params):
    have = " and ".join(sorted(p.upper() for p in _ddl.registrations()))
    raise NotImplementedError(
        f"jax_ddl has an allreduce handler for {have} in this build; on this platform use "
        "jax.lax.psum (a CUDA handler is built when nvcc is found at install time)."
    )


compat.mlir.register_lowering(allreduce_p, _unsupported_platform)
# Not cacheable: jax would lower identical calls once, as calls of one function, which
# XLA inlines into several instructions of one site number.
for _platform in _ddl.registrations():
    compat.mlir.register_lowering(
        allreduce_p,
        functools.partial(_lowering, platform=_platform.lower()),
        platform=_platform.lower(),
        cacheable=False,
    )


def _bind(rank, group, xs, **params):
    return allreduce_p.bind(rank, group, *xs, **params)


def _jvp(primals, tangents, **params):
    rank, group, *xs = primals
    if params["op"] != "sum":
        raise TypeError(
            f"jax_ddl.p{params['op']} is not differentiable (neither is jax.lax.p{params['op']}); "
            "use jax_ddl.psum or stop_gradient."
        )
    outs = allreduce_p.bind(rank, group, *xs, **params)
    ts = [compat.instantiate_zeros(t) for t in tangents[2:]]
    return outs, _bind(rank, group, ts, **params)


def _transpose(cts, rank, group, *xs, **params):
    axes = params["axes"]
    out = []
    for ct, x in zip(cts, xs):
        if type(ct) is compat.Zero:
            out.append(compat.Zero(x.aval))
        elif params["vma"]:
            # psum: varying -> invariant; its transpose broadcasts the cotangent back.
            missing = tuple(a for a in axes if a not in compat.vma(jax.typeof(ct)))
            out.append(compat.pvary(ct, missing))
        else:
            out.append(None)
    pending = [i for i, c in enumerate(out) if c is None]
    if pending:  # without vma (and in pmap) the transpose of psum is psum
        reduced = _bind(rank, group, [cts[i] for i in pending], **params)
        for i, r in zip(pending, reduced):
            out[i] = r
    return [None, None, *out]


compat.ad.primitive_jvps[allreduce_p] = _jvp
compat.ad.primitive_transposes[allreduce_p] = _transpose


def _batch(args, dims, **params):
    rank, group, *xs = args
    if dims[0] is not None or dims[1] is not None:
        raise NotImplementedError("jax_ddl: vmap over the rank of a collective is not supported")
    return allreduce_p.bind(rank, group, *xs, **params), list(dims[2:])


compat.batching.primitive_batchers[allreduce_p] = _batch


# ---------------------------------------------------------------------------------------
# The public functions.


def _canonical_axes(axis_name, api: str) -> tuple:
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not axes:
        raise ValueError(f"{api}: axis_name must name at least one axis; got {axis_name!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{api}: axis_name {axis_name!r} names an axis twice")
    for a in axes:
        if isinstance(a, int):
            raise ValueError(
                f"{api}: axis_name {axis_name!r} contains the positional axis {a}; jax_ddl reduces "
                "over named mesh axes only (use jnp.sum for array axes)"
            )
        if not compat.axis_bound(a):
            bound = compat.bound_axis_names()
            raise NameError(
                f"{api}: axis_name {a!r} is not bound here (bound axes: {list(bound)}). Call "
                f"{api} inside jax.shard_map or jax.pmap over a mesh axis named {a!r}."
            )
    return axes


_lax_leaves = 0  # leaves handed to jax.lax at trace time (see counters())


def _leaf_dtype(x) -> np.dtype:
    return np.dtype(jnp.result_type(x))


def _check_processes(size: int, api: str, axes: tuple) -> None:
    """At trace time: a reduction whose ranks span processes needs the MPI transport
    (attached by jax_ddl.distributed.initialize, or here on first use under mpiexec) and
    all devices of all processes."""
    local, procs = jax.local_device_count(), jax.process_count()
    if procs == 1 or size <= local:
        return
    if not _ddl.mpi_attached():
        from jax_ddl._src import distributed

        timeout = timeout_ms()
        distributed.attach_on_first_use(api, timeout / 1000 if timeout > 0 else 1e9)
    if size != local * procs:
        raise NotImplementedError(
            f"{api}: axes {list(axes)} span {size} of the {local * procs} devices; across "
            f"processes jax_ddl reduces over all devices of all processes so far (reduce "
            f"over a within-process axis with jax_ddl and the rest with jax.lax)."
        )


def allreduce(
    x,
    axis_name,
    *,
    op: str = "sum",
    topology=None,
    axis_index_groups=None,
    inplace: bool = True,
    api: str = "jax_ddl.allreduce",
):
    """Reduces every leaf of `x` over the named axes; the engine behind psum/pmax/pmin.

    Leaves are grouped by dtype and each group goes through one custom call (no
    concatenation). What jax_ddl does not reduce itself goes to jax.lax, with the result
    jax.lax gives: trees of constants only (every rank holds the same value; psum(1, axis)
    is the axis size as a Python int), leaves of other dtypes (uint8, int16, complex64,
    float8 types, ...) and calls with `axis_index_groups`. `inplace=False` gives the call
    fresh output buffers (for benchmarks).
    """
    global _lax_leaves
    if op not in OPS:
        raise ValueError(f"{api}: op must be one of {sorted(OPS)}; got {op!r}")
    axes = _canonical_axes(axis_name, api)
    lax_reduce = {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin}[op]
    leaves, treedef = jax.tree_util.tree_flatten(x)
    if axis_index_groups is not None:
        _lax_leaves += len(leaves)
        return lax_reduce(x, axes, axis_index_groups=axis_index_groups)
    if all(not compat.is_tracer(leaf) for leaf in leaves):
        return lax_reduce(x, axes)

    mesh = set(compat.manual_axes())
    mesh_axes = tuple(a for a in axes if a in mesh)
    other_axes = tuple(a for a in axes if a not in mesh)
    out: list = [None] * len(leaves)
    mine = []  # (index, leaf, dtype to give back) for jax_ddl
    for i, leaf in enumerate(leaves):
        dtype = _leaf_dtype(leaf)
        if dtype == np.bool_:
            # As lax: sums of bools are int32 counts; max / min of bools stay bool.
            give_back = np.dtype(np.int32) if op == "sum" else dtype
            mine.append((i, jnp.asarray(leaf).astype(np.int32), give_back))
        elif dtype in SUPPORTED_DTYPES:
            mine.append((i, jnp.asarray(leaf), dtype))
        else:
            _lax_leaves += 1
            out[i] = lax_reduce(leaf, axes)
    # vmap axis names are local (a reduction over a batch dimension): lax does that work.
    if other_axes:
        mine = [(i, lax_reduce(leaf, other_axes), d) for i, leaf, d in mine]
    if not mesh_axes:
        for i, leaf, d in mine:
            out[i] = leaf.astype(d) if leaf.dtype != d else leaf
        return jax.tree_util.tree_unflatten(treedef, out)

    automatic = compat.automatic_axes()
    if automatic:
        raise NotImplementedError(
            f"{api}: mesh axes {list(automatic)} are not manual here (a shard_map with "
            "axis_names= leaves them automatic), so several devices would share one rank. "
            "jax_ddl needs every mesh axis of size > 1 manual: add them to axis_names, or "
            "use jax.lax for this reduction."
        )
    sizes = compat.mesh_axis_sizes()
    size = math.prod(sizes[a] for a in mesh_axes)
    _check_processes(size, api, mesh_axes)  # may attach MPI: the default grid counts hosts
    dims = _topology.resolve(topology, size, api, mesh_axes)
    vma = compat.check_vma_enabled()

    groups = defaultdict(list)
    for i, leaf, _ in mine:
        if not compat.is_tracer(leaf):  # a constant: every rank holds the same value
            out[i] = leaf * size if op == "sum" else leaf
        elif leaf.size == 0 or (size == 1 and not _single_rank_calls()):
            out[i] = lax_reduce(leaf, mesh_axes)
        else:
            if vma:
                missing = tuple(a for a in mesh_axes if a not in compat.vma(jax.typeof(leaf)))
                leaf = compat.pvary(leaf, missing)
            groups[leaf.dtype].append((i, leaf))
    if groups:
        rank = lax.axis_index(mesh_axes).astype(jnp.int32)
        others = tuple(a for a in compat.manual_axes() if a not in mesh_axes)
        group = lax.axis_index(others).astype(jnp.int32) if others else jnp.int32(0)
        params = dict(
            axes=mesh_axes,
            group_axes=others,
            op=op,
            grid=None if dims == _topology.AUTO else tuple(dims),
            timeout=timeout_ms(),
            small=small_bytes(),
            chunk=chunk_bytes(),
            inplace=bool(inplace),
            vma=vma,
        )
        for members in groups.values():
            if dims == _topology.AUTO:
                dt = np.dtype(members[0][1].dtype)
                nbytes = sum(leaf.size for _, leaf in members) * dt.itemsize
                params["grid"] = _topology.choose(
                    size, nbytes, dt.name, bool(inplace), params["chunk"], params["small"]
                )
            reduced = _bind(rank, group, [leaf for _, leaf in members], **params)
            for (i, _), r in zip(members, reduced):
                out[i] = r
    for i, _, give_back in mine:
        if out[i].dtype != give_back:
            out[i] = out[i].astype(give_back)
    return jax.tree_util.tree_unflatten(treedef, out)


def psum(x, axis_name, *, topology=None, axis_index_groups=None, after=None):
    """All-reduce sum over named axes with DDL's topology-aware algorithm.

    A drop-in replacement for `jax.lax.psum` inside `jax.shard_map` (check_vma on or off)
    and `jax.pmap`, under `jit`, `vmap`, `grad`, `jvp` and `vjp`.

    Args:
      x: a pytree of arrays. jax_ddl reduces its float32, float64, bfloat16, float16,
        int32 and int64 leaves (bool is summed as int32, like jax.lax.psum), all leaves of
        one dtype in one call. Other leaves (uint8, int16, complex64, float8 types, ...)
        and trees of constants go to jax.lax, with jax.lax's result
        (`counters()["lax_leaves"]` counts them).
      axis_name: a mesh axis name, or a tuple of names (the rank is then linearised with
        the last name fastest, as `jax.lax.axis_index` does).
      topology: the grid the ranks form, innermost (fastest link) first, e.g. "4x2" or
        (4, 2); its dimensions must multiply to the number of ranks reduced over.
        Defaults to JAX_DDL_TOPOLOGY, else, over all devices of several processes, local
        devices x processes (x hosts, with several processes per host), else flat.
        "auto": the grid jax_ddl's cost model predicts fastest for this call's bytes
        (profile: JAX_DDL_PROFILE, else built-in terms; see jax_ddl.model.explain).
      axis_index_groups: as in jax.lax.psum; such a call is reduced by jax.lax.
      after: a pytree of arrays (or None). The call starts only once all of it has been
        computed; nothing else is done with it. It keeps a reduction, and XLA's reuse of
        its buffers, out of work that should run first: with gradient buckets
        (`sync_gradients`), `pmean(batch_stats, "data", after=grads)` reduces BatchNorm
        statistics after the backward pass instead of holding it up (docs/training.md).

    Returns:
      A pytree like `x` holding the sum over the axes, identical on every rank.

    Raises:
      NameError: an axis name is not bound (called outside shard_map/pmap).
      ValueError: a bad topology or axis name.

    Differentiation: linear. Its JVP is another jax_ddl.psum of the tangents; its
    transpose is what jax.lax.psum's is (an allreduce without check_vma, a no-op cast to
    varying with it).
    """
    return allreduce(
        _after(x, after),
        axis_name,
        op="sum",
        topology=topology,
        axis_index_groups=axis_index_groups,
        api="jax_ddl.psum",
    )


def mean_divisor(axes: tuple, axis_index_groups=None) -> int:
    """What pmean divides the sum by: the ranks reduced over (a group's size with groups)."""
    if axis_index_groups is not None:
        return len(axis_index_groups[0])
    return math.prod(lax.axis_size(a) for a in axes)


def _after(x, after):
    """`x`, passed through one gate with `after`'s leaves: consumers of the result (the
    call) run only once every leaf of `after` exists."""
    if after is None:
        return x
    leaves, treedef = jax.tree_util.tree_flatten(x)
    extra = jax.tree_util.tree_leaves(after)
    bad = [type(a).__name__ for a in extra if not hasattr(a, "dtype")]
    if bad:
        raise TypeError(
            f"jax_ddl: `after` must be a pytree of arrays; it holds {', '.join(sorted(set(bad)))}"
        )
    # Only traced leaves: constants stay constants (reduced as jax.lax reduces them).
    traced = [i for i, v in enumerate(leaves) if compat.is_tracer(v)]
    if not traced or not extra:
        return x
    gated = gate(tuple(leaves[i] for i in traced), tuple(extra))
    for i, g in zip(traced, gated):
        leaves[i] = g
    return jax.tree_util.tree_unflatten(treedef, leaves)


def pmean(x, axis_name, *, topology=None, axis_index_groups=None, after=None):
    """All-reduce mean: `psum(x) / axis size`, like `jax.lax.pmean`.

    Args/Returns/Raises: as `psum` (`after` too). Integer inputs give floating means, as in jax.lax.
    Differentiation: linear, as `psum`.
    """
    axes = _canonical_axes(axis_name, "jax_ddl.pmean")
    summed = allreduce(
        _after(x, after),
        axes,
        op="sum",
        topology=topology,
        axis_index_groups=axis_index_groups,
        api="jax_ddl.pmean",
    )
    n = mean_divisor(axes, axis_index_groups)
    return jax.tree_util.tree_map(lambda v: v / n, summed)


def pmax(x, axis_name, *, topology=None, axis_index_groups=None, after=None):
    """All-reduce maximum, like `jax.lax.pmax` (NaN propagates; bools stay bool).

    Args/Returns/Raises: as `psum`. Not differentiable (neither is jax.lax.pmax).
    """
    return allreduce(
        _after(x, after),
        axis_name,
        op="max",
        topology=topology,
        axis_index_groups=axis_index_groups,
        api="jax_ddl.pmax",
    )


def pmin(x, axis_name, *, topology=None, axis_index_groups=None, after=None):
    """All-reduce minimum, like `jax.lax.pmin` (NaN propagates; bools stay bool).

    Args/Returns/Raises: as `psum`. Not differentiable (neither is jax.lax.pmin).
    """
    return allreduce(
        _after(x, after),
        axis_name,
        op="min",
        topology=topology,
        axis_index_groups=axis_index_groups,
        api="jax_ddl.pmin",
    )


def supported_platforms() -> tuple:
    """Platforms ("cpu", "cuda") for which this build of jax_ddl has an allreduce handler."""
    return tuple(sorted(p.lower() for p in _ddl.registrations()))


def counters() -> dict:
    """Process-wide counters of the engine, since the last `reset_counters()`.

    Returns:
      dict with `calls` (custom calls, one per device per dtype group), `bytes` (bytes
      reduced, summed over devices), `errors`, `small_calls` (calls that took the one-shot
      small-message path), `stale_messages` (late cross-process messages of failed calls,
      recognised and dropped), `chunks` (pipeline chunks of calls across processes, summed
      over device threads: see JAX_DDL_CHUNK_BYTES), `lax_leaves` (leaves handed to
      jax.lax when a call was traced: dtypes jax_ddl does not reduce, or
      axis_index_groups), and seconds summed
      over device threads: `arrive_s` (waiting for all ranks), `reduce_scatter_s` (every
      stage but the last, with its barrier), `broadcast_s` (the last stage: reduce and
      write into every rank's output, then the exit barrier; for the pipelined calls
      across processes: `reduce_scatter_s` until the last chunk's local stages are done,
      which with one local stage includes waiting for earlier chunks' exchanges, and
      `broadcast_s` the rest), `small_s` (the one-shot
      small-message path's reduction) and `quiesce_s` (failing ranks waiting until no peer
      works on their buffers any more).
    """
    return {**_ddl.counters(), "lax_leaves": _lax_leaves}


def reset_counters() -> None:
    """Sets every counter back to zero."""
    global _lax_leaves
    _lax_leaves = 0
    _ddl.reset_counters()
