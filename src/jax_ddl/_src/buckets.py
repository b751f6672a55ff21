"""Gradient buckets: the gradient is reduced inside the backward pass, bucket by bucket.

`sync_gradients(params, axis)` returns `params` unchanged; in the backward pass the
cotangent of each bucket of leaves is summed over `axis` by jax_ddl as soon as the whole
bucket is ready, so the reduction of the last layers' gradients can run while the backward
pass of earlier layers still computes (the CPU handler returns an FFI future and XLA runs
independent work meanwhile). Buckets follow the reverse of the order in which the
parameters were created (a Flax module creates them in forward order), as PyTorch DDP and
Horovod bucket gradients. All the buckets' sums then pass through one gate
(jax_ddl._src.gate) and are divided by the axis size: nothing reads a bucket's sum before
every bucket's exists, which keeps XLA from handing its memory to the backward pass and
so making the backward pass wait for the pending call.

Results equal the unbucketed reduction bit for bit: every element is reduced in the plan's
order whichever call carries it, and divided as pmean divides.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import numpy as np

from jax_ddl._src import compat
from jax_ddl._src.collectives import mean_divisor, psum
from jax_ddl._src.gate import gate

# Measured (docs/training.md: ResNet-50 over 2 emulated hosts at 1 Gbit/s): 4 MiB buckets
# hid 73-81 % of the communication one call after the backward pass exposes, PyTorch
# DDP's 25 MiB 36 % (the last bucket, the first layers', is ready only when the backward pass
# ends: the larger it is, the more of the link's time comes after it). The first bucket
# smaller, as DDP's, so that communication starts early.
DEFAULT_BUCKET_BYTES = 4 * 2**20
DEFAULT_FIRST_BUCKET_BYTES = 1 * 2**20


def _raw_key(entry):
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _creation_order(tree) -> dict:
    """Path (tuple of raw keys) -> position of the leaf in the tree's insertion order."""
    order = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*path, i))
        else:
            order[path] = len(order)

    walk(tree, ())
    return order


def plan_buckets(tree, bucket_bytes: int, first_bucket_bytes: int | None = None) -> list:
    """The buckets of `tree`'s leaves, as lists of indices into jax.tree_util.tree_leaves.

    Leaves are taken in reverse creation order (dict insertion order; jax's flattening
    order where the tree is not made of dicts, lists and tuples) and packed greedily: a
    bucket closes once it holds at least its size in bytes (the first at least
    min(`first_bucket_bytes`, `bucket_bytes`)). `bucket_bytes` <= 0: one bucket.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    order = _creation_order(tree)
    paths = [tuple(_raw_key(e) for e in path) for path, _ in flat]
    if all(p in order for p in paths):
        positions = [order[p] for p in paths]
    else:
        positions = list(range(len(flat)))
    sequence = sorted(range(len(flat)), key=lambda i: positions[i], reverse=True)
    if bucket_bytes <= 0:
        return [sequence] if sequence else []
    first = bucket_bytes if first_bucket_bytes is None else min(first_bucket_bytes, bucket_bytes)
    buckets, current, size = [], [], 0
    for i in sequence:
        leaf = flat[i][1]
        current.append(i)
        size += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
        if size >= (first if not buckets else bucket_bytes):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def _axes(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _to_varying(leaves, axes):
    """Each leaf cast to varying over `axes` (a no-op without check_vma)."""
    if not compat.check_vma_enabled():
        return tuple(leaves)
    return tuple(
        compat.pvary(x, tuple(a for a in axes if a not in compat.vma(jax.typeof(x))))
        for x in leaves
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _synced(leaves, axis_name, topology, primal_vma):
    return _to_varying(leaves, _axes(axis_name))


def _synced_fwd(leaves, axis_name, topology, primal_vma):
    return _to_varying(leaves, _axes(axis_name)), None


def _synced_bwd(axis_name, topology, primal_vma, _, cotangents):
    """One bucket: its gradient summed over `axis_name` (the mean, if asked for, is taken
    after the gate in `_gathered_bwd`, so that nothing reads the sum before then)."""
    out = psum(tuple(cotangents), axis_name, topology=topology)
    if compat.check_vma_enabled():
        # The reduced gradient is invariant over the axes; a primal that was varying over
        # them gets a varying cotangent, as its type requires.
        axes = _axes(axis_name)
        out = tuple(
            compat.pvary(o, tuple(a for a in axes if a in v and a not in compat.vma(jax.typeof(o))))
            for o, v in zip(out, primal_vma)
        )
    return (tuple(out),)


_synced.defvjp(_synced_fwd, _synced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(leaves, axis_name, mean):
    return leaves


def _gathered_fwd(leaves, axis_name, mean):
    return leaves, None


def _gathered_bwd(axis_name, mean, _, cotangents):
    """Every bucket's sum, once all exist: through one gate (jax_ddl._src.gate), then
    divided by the axis size for the mean, exactly as pmean divides psum's result."""
    out = gate(tuple(cotangents))
    if mean:
        n = mean_divisor(_axes(axis_name))
        out = tuple(o / n for o in out)
    return (tuple(out),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def sync_gradients(
    params,
    axis_name,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    first_bucket_bytes: int | None = DEFAULT_FIRST_BUCKET_BYTES,
    mean: bool = True,
    topology=None,
):
    """Marks `params` so that their gradient is reduced over `axis_name` in the backward
    pass, in buckets, as each bucket's gradient becomes ready.

    Use inside shard_map or pmap on the parameters you differentiate, and do not reduce
    those gradients again::

        def loss_fn(params):                       # params: replicated, as P()
            params = jax_ddl.sync_gradients(params, "data")
            ...
        grads = jax.grad(loss_fn)(state.params)    # already averaged over "data"

    Under check_vma it also does what `jax.lax.pcast(params, axis, to="varying")` does
    before differentiating (so that grad inserts no psum of its own): the parameters it
    returns vary over the axis, and an invariant parameter gets an invariant gradient (it
    can leave through out_specs=P()). Parameters already varying keep varying gradients.

    Args:
      params: a pytree of arrays (a Flax params dict: creation order is forward order).
      axis_name: the mesh axis (or tuple of axes) to reduce over, as for `pmean`.
      bucket_bytes: bytes per bucket (<= 0: one bucket, one call after the backward pass).
      first_bucket_bytes: bytes of the first bucket (the last layers' gradients), smaller
        so that communication starts early; None: `bucket_bytes`.
      mean: average (True, `pmean`) or sum (`psum`).
      topology: passed to jax_ddl's reduction.

    Returns:
      `params`, unchanged in value (varying over `axis_name` under check_vma).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        return params
    vmas = [frozenset(compat.vma(jax.typeof(x))) for x in leaves]
    axis_key = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    if isinstance(topology, list):  # non-differentiable arguments must hash
        topology = tuple(topology)
    leaves = list(_gathered(tuple(leaves), axis_key, mean))
    out = list(leaves)
    for bucket in plan_buckets(params, bucket_bytes, first_bucket_bytes):
        synced = _synced(
            tuple(leaves[i] for i in bucket),
            axis_key,
            topology,
            tuple(vmas[i] for i in bucket),
        )
        for i, leaf in zip(bucket, synced):
            out[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, out)
