"""jax_ddl on NVIDIA GPUs, through the CUDA handler: exact results against numpy for every
dtype and op, several shapes (empty, odd, large), in place and out of place, pytrees and
gradients, over all GPUs of this process. Skipped without a GPU or without the CUDA
handler (tools/gpu_check.sh runs these on the GPU machine).

jax_ddl hands a reduction over one rank to jax.lax (XLA removes it); these tests set the
test-only JAX_DDL_TEST_SINGLE_RANK_CALLS=1 so that with one GPU the handler still runs
(a copy, or nothing in place). With several GPUs the stage kernels run through peer
access. Values are small integers, so every order of summation gives the same exact
result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ddl


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return []


GPUS = _gpus()
pytestmark = pytest.mark.skipif(
    not GPUS or "cuda" not in jax_ddl.supported_platforms(),
    reason="needs an NVIDIA GPU and a jax_ddl build with the CUDA handler",
)
N = len(GPUS)
DTYPES = [np.float32, np.float64, jnp.bfloat16, np.float16, np.int32, np.int64]
OPS = {"sum": (jax_ddl.psum, np.sum), "max": (jax_ddl.pmax, np.max), "min": (jax_ddl.pmin, np.min)}


@pytest.fixture(autouse=True)
def _through_the_handler(monkeypatch):
    monkeypatch.setenv("JAX_DDL_TEST_SINGLE_RANK_CALLS", "1")


def _spmd(fn, donate=False):
    mesh = Mesh(np.array(GPUS), ("i",))
    f = jax.shard_map(fn, mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=False)
    return jax.jit(f, donate_argnums=(0,) if donate else ())


def _rows(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-8, 9, size=(N, *shape)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (1 << 20) + 3])
def test_exact_against_numpy(dtype, op, shape):
    shape = shape if isinstance(shape, tuple) else (shape,)
    ours, numpy_op = OPS[op]
    x = _rows(shape, dtype, seed=len(op) + sum(shape))
    before = jax_ddl.counters()["calls"]
    got = np.asarray(_spmd(lambda v: ours(v, "i"))(jnp.asarray(x)), np.float64)
    want = numpy_op(x.astype(np.float64), axis=0, keepdims=True) if x.size else x[:1]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape).astype(np.float64))
    if x.size:  # empty leaves go to jax.lax (nothing to reduce)
        assert jax_ddl.counters()["calls"] > before  # the CUDA handler ran, not a fallback


def test_in_place_pytree_and_pmean():
    tree = {"w": _rows((33, 17), np.float32, 1), "b": _rows((5,), np.float32, 2)}
    f = _spmd(lambda t: jax_ddl.pmean(t, "i"), donate=True)
    got = f(jax.tree_util.tree_map(jnp.asarray, tree))
    for k, v in tree.items():
        np.testing.assert_allclose(np.asarray(got[k]), np.broadcast_to(v.mean(0), got[k].shape))


def test_grad_matches_lax():
    x = jnp.asarray(_rows((64,), np.float32, 3))

    def loss(v, reduce):
        return jnp.sum(reduce(v * v, "i") ** 2)

    ours = _spmd(lambda v: jax.grad(loss)(v, jax_ddl.psum))(x)
    lax = _spmd(lambda v: jax.grad(loss)(v, jax.lax.psum))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(lax), rtol=1e-6)


def test_many_calls_in_one_program_pair_correctly():
    """Six independent same-shape calls (XLA may order them differently per GPU)."""
    x = jnp.asarray(_rows((1 << 16,), np.float32, 4))

    def body(v):
        return jnp.stack([jax_ddl.psum(v * (k + 1) + k, "i") for k in range(6)])

    got = np.asarray(_spmd(body)(x))
    base = np.asarray(x, np.float64)
    for k in range(6):
        want = (base * (k + 1) + k).sum(0)
        np.testing.assert_array_equal(got[k], np.broadcast_to(want, got[k].shape))
