"""jax_ddl.psum/pmean/pmax/pmin against jax.lax and numpy, exact where inputs allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ZERO_SIZE_LEAVES_OK, count_ddl_calls, int_valued, mesh_of, spmd
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_ddl

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int64]
TOPOLOGIES_8 = ["8", "2x4", "4x2", "2x2x2", "1x8", "8x1"]


def _sum_fn(topology):
    return lambda v: jax_ddl.psum(v, "i", topology=topology)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [True, False], ids=["small-path", "large-path"])
def test_psum_exact_per_dtype(dtype, small, monkeypatch):
    monkeypatch.setenv("JAX_DDL_SMALL_BYTES", "1000000" if small else "0")
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 37), dtype)
    before = np.asarray(x).copy()
    out = spmd(_sum_fn("2x4"), mesh, P("i"), P())(x)
    expected = np.asarray(x, np.float64).sum(0, keepdims=True)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float64), expected)
    np.testing.assert_array_equal(np.asarray(x), before)  # input unchanged


@pytest.mark.parametrize("topology", TOPOLOGIES_8)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 6000])
def test_psum_sizes_and_topologies(topology, n):
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, n), jnp.float32, seed=n)
    out = spmd(_sum_fn(topology), mesh, P("i"), P("i"), check_vma=False)(x)
    ref = spmd(lambda v: lax.psum(v, "i"), mesh, P("i"), P("i"), check_vma=False)(x)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    "ndev,topology", [(1, "1"), (2, "2"), (3, "3"), (4, "2x2"), (4, "4"), (8, None)]
)
def test_device_counts(ndev, topology):
    mesh = mesh_of((ndev,), ("i",))
    x = int_valued((ndev, 3, 50), jnp.float32)
    out = spmd(_sum_fn(topology), mesh, P("i"), P())(x)
    np.testing.assert_array_equal(out[0], np.asarray(x).sum(0))


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pmax_pmin(op, dtype):
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 300), dtype, seed=3, low=-1000, high=1000)
    ours = {"max": jax_ddl.pmax, "min": jax_ddl.pmin}[op]
    theirs = {"max": lax.pmax, "min": lax.pmin}[op]
    out = spmd(lambda v: ours(v, "i", topology="2x4"), mesh, P("i"), P())(x)
    ref = spmd(lambda v: theirs(v, "i"), mesh, P("i"), P())(x)
    np.testing.assert_array_equal(out, ref)


def test_pmax_propagates_nan():
    mesh = mesh_of((8,), ("i",))
    x = np.zeros((8, 4), np.float32)
    x[5, 2] = np.nan
    out = spmd(lambda v: jax_ddl.pmax(v, "i"), mesh, P("i"), P())(jnp.asarray(x))
    assert np.isnan(out[0, 2]) and not np.isnan(out[0, [0, 1, 3]]).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.float16])
def test_pmean_matches_lax(dtype):
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 64), dtype)
    out = spmd(lambda v: jax_ddl.pmean(v, "i"), mesh, P("i"), P())(x)
    ref = spmd(lambda v: lax.pmean(v, "i"), mesh, P("i"), P())(x)
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)


def test_bool_like_lax_summed_as_int32_max_and_min_stay_bool():
    mesh = mesh_of((8,), ("i",))
    x = jnp.asarray(np.arange(8 * 5).reshape(8, 5) % 3 == 0)
    for ddl_op, lax_op, dtype in [
        (jax_ddl.psum, lax.psum, jnp.int32),
        (jax_ddl.pmax, lax.pmax, jnp.bool_),
        (jax_ddl.pmin, lax.pmin, jnp.bool_),
    ]:
        jax_ddl.reset_counters()
        out = jax.block_until_ready(spmd(lambda v, f=ddl_op: f(v, "i"), mesh, P("i"), P())(x))
        ref = spmd(lambda v, f=lax_op: f(v, "i"), mesh, P("i"), P())(x)
        assert out.dtype == ref.dtype == dtype
        np.testing.assert_array_equal(out, ref)
        assert jax_ddl.counters()["calls"] == 8  # through jax_ddl, not lax


def test_constants_give_what_lax_gives_without_communicating():
    """psum(1, axis) is the axis size as a Python int, usable as a shape, as in jax.lax;
    every constant tree gives lax's values and types, and no call runs."""
    mesh = mesh_of((8,), ("i",))
    seen = {}

    def body(v):
        for name, c in [("int", 1), ("float", 2.0), ("np32", np.float32(3)), ("arr", np.ones(3))]:
            seen[name] = (jax_ddl.psum(c, "i"), lax.psum(c, "i"))
            seen["mean-" + name] = (jax_ddl.pmean(c, "i"), lax.pmean(c, "i"))
        return v + jnp.zeros(jax_ddl.psum(1, "i"))[0]

    jax_ddl.reset_counters()
    jax.block_until_ready(spmd(body, mesh, P("i"), P("i"))(jnp.zeros(8)))
    assert jax_ddl.counters()["calls"] == 0
    assert type(seen["int"][0]) is int and seen["int"][0] == 8
    for name, (got, want) in seen.items():
        assert type(got) is type(want), name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_axis_index_groups_like_lax():
    """Accepted as jax.lax accepts it, reduced by jax.lax: in pmap and in shard_map without
    check_vma; with check_vma jax.lax refuses it, and so does jax_ddl, in lax's words."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    x = int_valued((8, 5), jnp.float32)
    for ddl_op, lax_op in [(jax_ddl.psum, lax.psum), (jax_ddl.pmean, lax.pmean)]:
        got = jax.pmap(lambda v, f=ddl_op: f(v, "i", axis_index_groups=groups), axis_name="i")(x)
        want = jax.pmap(lambda v, f=lax_op: f(v, "i", axis_index_groups=groups), axis_name="i")(x)
        np.testing.assert_array_equal(got, want)
    mesh = mesh_of((8,), ("i",))
    jax_ddl.reset_counters()
    got = jax.block_until_ready(
        spmd(lambda v: jax_ddl.pmax(v, "i", axis_index_groups=groups), mesh, P("i"), P("i"), False)(
            x
        )
    )
    want = spmd(lambda v: lax.pmax(v, "i", axis_index_groups=groups), mesh, P("i"), P("i"), False)(
        x
    )
    np.testing.assert_array_equal(got, want)
    assert jax_ddl.counters()["lax_leaves"] == 1
    with pytest.raises(NotImplementedError) as ours:
        spmd(lambda v: jax_ddl.psum(v, "i", axis_index_groups=groups), mesh, P("i"), P("i"))(x)
    with pytest.raises(NotImplementedError) as theirs:
        spmd(lambda v: lax.psum(v, "i", axis_index_groups=groups), mesh, P("i"), P("i"))(x)
    assert str(ours.value) == str(theirs.value)


def test_pytree_one_call_per_dtype():
    mesh = mesh_of((8,), ("i",))
    tree = {
        "w": int_valued((8, 4, 5), jnp.float32, 1),
        "b": [int_valued((8, 5), jnp.float32, 2), int_valued((8,), jnp.int32, 3)],
        "h": int_valued((8, 3, 3), jnp.bfloat16, 4),
    }
    if ZERO_SIZE_LEAVES_OK:
        tree["empty"] = jnp.zeros((8, 0), jnp.float32)
    specs = jax.tree_util.tree_map(lambda _: P("i"), tree)
    out_specs = jax.tree_util.tree_map(lambda _: P(), tree)
    fn = lambda t: jax_ddl.psum(t, "i", topology="4x2")  # noqa: E731
    f = spmd(fn, mesh, (specs,), out_specs)
    assert count_ddl_calls(f, tree) == 3  # float32, int32, bfloat16
    jaxpr = str(jax.make_jaxpr(f)(tree))
    assert "concatenate" not in jaxpr
    jax_ddl.reset_counters()
    out = jax.block_until_ready(f(tree))
    assert jax_ddl.counters()["calls"] == 3 * 8
    ref = spmd(lambda t: lax.psum(t, "i"), mesh, (specs,), out_specs)(tree)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize("axes", ["a", "b", ("a", "b"), ("b", "a")])
@pytest.mark.parametrize("check_vma", [True, False])
def test_multi_axis_mesh(axes, check_vma):
    mesh = mesh_of((2, 4), ("a", "b"))
    x = int_valued((8, 2, 3), jnp.float32)
    out_spec = P(("a", "b"))
    ours = spmd(lambda v: jax_ddl.psum(v, axes), mesh, P(("a", "b")), out_spec, check_vma=False)
    ref = spmd(lambda v: lax.psum(v, axes), mesh, P(("a", "b")), out_spec, check_vma=False)
    np.testing.assert_array_equal(ours(x), ref(x))
    if check_vma:  # the result is invariant over the reduced axes, like lax.psum's
        names = axes if isinstance(axes, tuple) else (axes,)
        rest = tuple(n for n in ("a", "b") if n not in names)
        spec = P(rest if rest else None)
        ours = spmd(lambda v: jax_ddl.psum(v, axes), mesh, P(("a", "b")), spec)
        ref = spmd(lambda v: lax.psum(v, axes), mesh, P(("a", "b")), spec)
        np.testing.assert_array_equal(ours(x), ref(x))


def test_vma_typing_matches_lax():
    mesh = mesh_of((2, 4), ("a", "b"))

    def body(v):
        ours, theirs = jax_ddl.psum(v, "b"), lax.psum(v, "b")
        assert jax.typeof(ours) == jax.typeof(theirs), (jax.typeof(ours), jax.typeof(theirs))
        return ours

    spmd(body, mesh, P(("a", "b")), P("a"))(jnp.ones((8, 2)))


def test_pmap():
    x = int_valued((8, 33), jnp.float32)
    jax_ddl.reset_counters()
    out = jax.block_until_ready(jax.pmap(lambda v: jax_ddl.psum(v, "i"), axis_name="i")(x))
    assert jax_ddl.counters()["calls"] == 8  # jax_ddl ran, on every device
    ref = jax.pmap(lambda v: lax.psum(v, "i"), axis_name="i")(x)
    np.testing.assert_array_equal(out, ref)
    jax_ddl.reset_counters()
    g = jax.block_until_ready(
        jax.pmap(jax.grad(lambda v: jax_ddl.psum(v * v, "i").sum()), axis_name="i")(x)
    )
    assert jax_ddl.counters()["calls"] >= 8  # the transpose is a jax_ddl allreduce too
    gr = jax.pmap(jax.grad(lambda v: lax.psum(v * v, "i").sum()), axis_name="i")(x)
    np.testing.assert_array_equal(g, gr)


def test_eager_shard_map_without_jit():
    mesh = mesh_of((4,), ("i",))
    x = int_valued((4, 6), jnp.float32)
    f = jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    jax_ddl.reset_counters()
    np.testing.assert_array_equal(f(x)[0], np.asarray(x).sum(0))
    assert jax_ddl.counters()["calls"] == 4


def test_results_deterministic_and_identical_on_all_ranks():
    mesh = mesh_of((8,), ("i",))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5000)), jnp.float32)
    f = spmd(
        lambda v: jax_ddl.psum(v, "i", topology="2x2x2"), mesh, P("i"), P("i"), check_vma=False
    )
    a, b = np.asarray(f(x)), np.asarray(f(x))
    np.testing.assert_array_equal(a, b)
    for r in range(8):
        np.testing.assert_array_equal(a[r], a[0])
    np.testing.assert_allclose(a[0], np.asarray(x, np.float64).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("small", [True, False], ids=["small-path", "large-path"])
def test_16bit_accumulates_in_float32_rounded_once(dtype, small, monkeypatch):
    """Expected: the float32 sum in plan order ("2x4": over c0, then c1), rounded once."""
    monkeypatch.setenv("JAX_DDL_SMALL_BYTES", "1000000" if small else "0")
    mesh = mesh_of((8,), ("i",))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4001)), dtype)
    out = spmd(lambda v: jax_ddl.psum(v, "i", topology="2x4"), mesh, P("i"), P())(x)
    xf = np.asarray(x, np.float32)
    inner = [xf[2 * c1] + xf[2 * c1 + 1] for c1 in range(4)]
    total = ((inner[0] + inner[1]) + inner[2]) + inner[3]
    expected = jnp.asarray(total).astype(dtype)
    np.testing.assert_array_equal(
        np.asarray(out[0]).view(np.uint16), np.asarray(expected).view(np.uint16)
    )


def test_in_a_loop_body_and_repeated_calls():
    mesh = mesh_of((8,), ("i",))

    def body(v):
        def step(carry, _):
            return jax_ddl.pmean(carry, "i") + 1.0, None

        return lax.scan(step, v, None, length=5)[0]

    x = int_valued((8, 20), jnp.float32)
    out = spmd(body, mesh, P("i"), P("i"), check_vma=False)(x)
    ref = spmd(
        lambda v: lax.scan(lambda c, _: (lax.pmean(c, "i") + 1.0, None), v, None, length=5)[0],
        mesh,
        P("i"),
        P("i"),
        check_vma=False,
    )(x)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_two_independent_calls_in_one_program():
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 50), jnp.float32, 1)
    y = int_valued((8, 50), jnp.float32, 2)
    f = spmd(
        lambda a, b: (jax_ddl.psum(a, "i"), jax_ddl.psum(b * 2, "i")),
        mesh,
        (P("i"), P("i")),
        (P(), P()),
    )
    a, b = f(x, y)
    np.testing.assert_array_equal(a[0], np.asarray(x).sum(0))
    np.testing.assert_array_equal(b[0], 2 * np.asarray(y).sum(0))


def test_counters_report_calls_bytes_and_stage_times(monkeypatch):
    monkeypatch.setenv("JAX_DDL_SMALL_BYTES", "0")
    mesh = mesh_of((8,), ("i",))
    x = int_valued((8, 1024), jnp.float32)
    f = spmd(lambda v: jax_ddl.psum(v, "i", topology="2x4"), mesh, P("i"), P())
    f(x).block_until_ready()
    jax_ddl.reset_counters()
    f(x).block_until_ready()
    c = jax_ddl.counters()
    assert c["calls"] == 8 and c["bytes"] == 8 * 1024 * 4 and c["errors"] == 0
    assert c["small_calls"] == 0
    assert c["reduce_scatter_s"] > 0 and c["broadcast_s"] > 0


@pytest.mark.parametrize("axes,topology", [(("a", "b"), "4x2"), (("b", "a"), "2x4"), ("b", "2x2")])
def test_multi_axis_mesh_with_topology(axes, topology):
    mesh = mesh_of((2, 4), ("a", "b"))
    x = int_valued((8, 2, 7), jnp.float32)
    spec = P(("a", "b"))
    ours = spmd(lambda v: jax_ddl.psum(v, axes, topology=topology), mesh, spec, spec, False)
    ref = spmd(lambda v: lax.psum(v, axes), mesh, spec, spec, False)
    np.testing.assert_array_equal(ours(x), ref(x))


def test_concurrent_executions_from_several_threads():
    """Executions dispatched from several Python threads at once (of one program and of
    different programs, small and large messages) are told apart by their run ids."""
    from concurrent.futures import ThreadPoolExecutor

    mesh = mesh_of((8,), ("i",))
    shared = jax.jit(
        jax.shard_map(
            lambda v, k: jax_ddl.psum(v * k, "i", topology="2x4"),
            mesh=mesh,
            in_specs=(P("i"), P()),
            out_specs=P(),
        )
    )
    other = spmd(lambda v: jax_ddl.psum(v, "i"), mesh, P("i"), P())
    xs = [int_valued((8, n), jnp.float32, seed=n) for n in (100, 30000)]

    def work(k):
        for i in range(20):
            x = xs[i % 2]
            expected = np.asarray(x).sum(0)
            np.testing.assert_array_equal(np.asarray(shared(x, jnp.float32(k)))[0], k * expected)
            np.testing.assert_array_equal(np.asarray(other(x))[0], expected)
        return k

    with ThreadPoolExecutor(3) as pool:
        assert sorted(pool.map(work, (1, 2, 3))) == [1, 2, 3]


def test_single_rank_reductions_go_to_lax_unless_the_test_switch_is_set(monkeypatch):
    """Over one rank jax_ddl hands the reduction to jax.lax (XLA removes it, as it does
    lax.psum over one device); JAX_DDL_TEST_SINGLE_RANK_CALLS=1 sends it through the
    handler instead, which is how a one-GPU machine exercises the CUDA handler."""
    mesh = mesh_of((1,), ("i",))
    x = jnp.arange(12.0).reshape(1, 12)

    def run():
        f = jax.jit(
            jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
        )
        before = jax_ddl.counters()["calls"]
        np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x))
        return jax_ddl.counters()["calls"] - before

    assert run() == 0
    monkeypatch.setenv("JAX_DDL_TEST_SINGLE_RANK_CALLS", "1")
    assert run() == 1
