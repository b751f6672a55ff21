"""jax_ddl.sync_gradients: gradients reduced inside the backward pass, bucket by bucket, in
reverse creation order; results equal the unbucketed reduction bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_ddl_calls, mesh_of
from jax.sharding import PartitionSpec as P

import jax_ddl
from jax_ddl._src.buckets import plan_buckets


def test_buckets_follow_reverse_creation_order_and_sizes():
    # jax flattens dict keys sorted: a_second (0), m_third (1), z_first (2); created z, a, m.
    tree = {
        "z_first": np.zeros(1000, np.float32),  # 4000 bytes
        "a_second": np.zeros(100, np.float32),  # 400 bytes
        "m_third": np.zeros(3000, np.float32),  # 12000 bytes
    }
    assert plan_buckets(tree, 4000, 1000) == [[1], [0, 2]]
    assert plan_buckets(tree, 4000, None) == [[1], [0, 2]]
    assert plan_buckets(tree, 100, 100) == [[1], [0], [2]]
    assert plan_buckets(tree, 400, 1 << 20) == [[1], [0], [2]]  # first never the larger
    assert plan_buckets(tree, 0) == [[1, 0, 2]]
    assert plan_buckets({}, 4000) == []
    # Not made of dicts/lists/tuples throughout: jax's order, reversed.
    assert plan_buckets(jax.tree_util.Partial(lambda *a: 0, np.zeros(3), np.zeros(4)), 0) == [
        [1, 0]
    ]


def _params():
    rng = np.random.default_rng(0)

    def w(*shape, dtype=np.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    # Created in forward order, as a Flax module creates them.
    return {
        "stem": {"kernel": w(12, 16), "bias": w(16)},
        "block": {"kernel": w(16, 16), "scale": w(16, dtype=jnp.bfloat16)},
        "head": {"kernel": w(16, 10), "bias": w(10)},
    }


def _loss(p, x):
    h = jnp.tanh(x @ p["stem"]["kernel"] + p["stem"]["bias"])
    h = jnp.tanh(h @ p["block"]["kernel"]) * p["block"]["scale"].astype(jnp.float32)
    return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)


def _grads(bucketed, topology, bucket_bytes, check_vma, cast_first=True):
    def body(p, x):
        if check_vma and (cast_first or not bucketed):
            p = jax.lax.pcast(p, "i", to="varying")
        if bucketed:
            loss = lambda q: _loss(  # noqa: E731
                jax_ddl.sync_gradients(
                    q, "i", bucket_bytes=bucket_bytes, first_bucket_bytes=256, topology=topology
                ),
                x,
            )
            g = jax.grad(loss)(p)
        else:
            g = jax_ddl.pmean(jax.grad(_loss)(p, x), "i", topology=topology)
        return jax.tree_util.tree_map(lambda a: a[None], g)

    mesh = mesh_of((8,), ("i",))
    f = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P("i")), out_specs=P("i"), check_vma=check_vma
    )
    return jax.jit(f)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("topology", [None, "2x4", "2x2x2"])
@pytest.mark.parametrize("bucket_bytes", [512, 1 << 20])
def test_bucketed_gradients_equal_the_unbucketed_reduction_bitwise(
    topology, bucket_bytes, check_vma
):
    params = _params()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8 * 5, 12)), jnp.float32)
    want = _grads(False, topology, bucket_bytes, check_vma)(params, x)
    got = _grads(True, topology, bucket_bytes, check_vma)(params, x)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        np.testing.assert_array_equal(
            np.asarray(g, np.float32), np.asarray(w, np.float32), str(path)
        )
        assert np.all(np.asarray(g) == np.asarray(g)[:1]), f"{path}: devices disagree"
    # Small buckets: one call per bucket (and per dtype in it); one bucket: one per dtype.
    calls = count_ddl_calls(_grads(True, topology, bucket_bytes, check_vma), params, x)
    n_buckets = len(plan_buckets(params, bucket_bytes, 256))
    assert calls >= n_buckets > (1 if bucket_bytes == 512 else 0), (calls, n_buckets)


def test_sum_and_gradient_of_unsynced_leaves_untouched():
    mesh = mesh_of((8,), ("i",))
    x = jnp.arange(8.0).reshape(8, 1)

    def body(w, x):
        w = jax.lax.pcast(w, "i", to="varying")
        g = jax.grad(lambda v: jnp.sum(jax_ddl.sync_gradients(v, "i", mean=False) * x))(w)
        return g

    g = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("i")), out_specs=P("i")))(
        jnp.ones((1, 1)), x
    )
    np.testing.assert_array_equal(np.asarray(g).ravel(), np.full(8, 28.0))  # sum of 0..7


def test_invariant_parameters_get_invariant_gradients():
    """Given replicated (invariant) parameters, sync_gradients casts them to varying itself
    and their averaged gradient is invariant: it can leave through out_specs=P()."""
    params = _params()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8 * 5, 12)), jnp.float32)
    mesh = mesh_of((8,), ("i",))

    def body(p, x):
        return jax.grad(lambda q: _loss(jax_ddl.sync_gradients(q, "i", bucket_bytes=512), x))(p)

    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("i")), out_specs=P()))(params, x)
    want = _grads(False, None, 0, True)(params, x)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32)[0])


def test_after_only_orders_the_call_results_and_gradients_unchanged():
    """`after=` adds an ordering, nothing else: the same bits as without it, under grad too,
    and the compiled program holds a gate before each such call (XLA keeps custom calls)."""
    mesh = mesh_of((8,), ("i",))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8 * 4, 33)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(4).standard_normal((8 * 4, 5)), jnp.float32)

    def body(x, y, with_after):
        kw = {"after": (y * 2, {"k": y})} if with_after else {}
        s = jax_ddl.psum(x, "i", **kw)
        m = jax_ddl.pmean({"a": x, "b": x[:, :3]}, "i", **kw)
        hi = jax_ddl.pmax(x, "i", **kw)
        g = jax.grad(lambda v: jnp.sum(jax_ddl.pmean(v * v, "i", **kw)))(x)
        # A constant stays a constant (jax.lax's 0.1 * 8, not a sum of eight 0.1s).
        c = jnp.full((1,), jax_ddl.psum(0.1, "i", **kw))
        return s, m, hi, g, c

    outs = {}
    for with_after in (False, True):
        f = jax.jit(
            jax.shard_map(
                lambda x, y, w=with_after: body(x, y, w),
                mesh=mesh,
                in_specs=(P("i"), P("i")),
                out_specs=P("i"),
            )
        )
        outs[with_after] = jax.tree_util.tree_leaves(f(x, y))
        text = f.lower(x, y).compile().as_text()
        gates = text.count('custom_call_target="jax_ddl_gate"')
        assert (gates >= 3) if with_after else (gates == 0), gates  # psum, pmean, pmax
    for a, b in zip(outs[False], outs[True]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = np.asarray(x).reshape(8, 4, 33)
    np.testing.assert_allclose(
        np.asarray(outs[True][0]).reshape(8, 4, 33)[0], rows.sum(0), rtol=1e-5
    )


def test_after_must_hold_arrays():
    mesh = mesh_of((8,), ("i",))
    f = jax.jit(
        jax.shard_map(
            lambda x: jax_ddl.psum(x, "i", after={"note": "not an array"}),
            mesh=mesh,
            in_specs=P("i"),
            out_specs=P(),
        )
    )
    with pytest.raises(TypeError, match="`after` must be a pytree of arrays; it holds str"):
        f(jnp.ones(8))
