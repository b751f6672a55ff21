"""Run under mpiexec by tests/test_multiprocess.py: N processes x L host devices each.

Every process checks its own results against numpy of the global data (integer-valued,
so every sum is exact): jax.lax.psum across processes (gloo); jax_ddl.psum across
processes with the default topology and every one given on the command line (those that
split at the process boundary run DDL's hierarchy, the others, such as the flat spec,
exchange with remote group peers stage by stage), also bitwise against float32 sums in
the plan's order on random data; a pytree of several dtypes;
pmean against jax.lax.pmean; grad; jax_ddl inside each process; and the refusal of an
axis that mixes processes unsupportedly. Prints "OK <rank>" at the end.

    mpiexec -n 2 python tests/mpi_programs/collectives.py 4 [4x2 2x2x2 8 ...]

EXPECT_HOSTS (default 1): the hosts the processes are spread over (consecutive ranks per
host); with several processes per host the default topology then has a host dimension.
"""

import os
import sys

import jax_ddl.distributed

local = int(sys.argv[1])
topologies = [None, *sys.argv[2:]]
info = jax_ddl.distributed.initialize(local_devices=local)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ddl  # noqa: E402
from jax_ddl import _ddl  # noqa: E402

rank, procs = info["process_index"], info["process_count"]
assert (jax.process_index(), jax.process_count()) == (rank, procs), info
assert jax.local_device_count() == local and jax.device_count() == local * procs
hosts = int(os.environ.get("EXPECT_HOSTS", "1"))
assert info["hosts"] == hosts and info["processes_per_host"] == procs // hosts, info
n = local * procs
# The default topology: local devices, processes per host, hosts (dimensions of 1 left out).
default = (local, procs // hosts, hosts) if 1 < hosts < procs else (local, procs)
flat = Mesh(np.array(jax.devices()), ("i",))
ROWS = P("i")


def global_array(glob, mesh=flat, spec=ROWS):
    """The process's rows of `glob` (one leading row per device), as a global array."""
    mine = glob[rank * local : (rank + 1) * local]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), mine, glob.shape)


def rows(y):
    return [np.asarray(s.data)[0] for s in y.addressable_shards]


def spmd(fn, out_specs=ROWS):
    return jax.jit(jax.shard_map(fn, mesh=flat, in_specs=P("i"), out_specs=out_specs))


pattern = np.arange(30011) % 7 - 3  # odd length: slices of unequal size everywhere
glob = np.stack([(g + 1) * pattern for g in range(n)]).astype(np.float32)
want = glob.sum(0)
x = global_array(glob)

for got in rows(spmd(lambda v: jax.lax.psum(v, "i"))(x)):
    np.testing.assert_array_equal(got, want)


def plan_order_sum(data, dims):
    """float32 sums in DDL's plan order: over the innermost dimension first, each group's
    copies added in rank order. What jax_ddl computes, bit for bit, whichever ranks share
    a process."""
    acc = data.reshape(*reversed(dims), data.shape[-1])  # rank = c0 + d0 * (c1 + d1 * ...)
    for _ in dims:
        total = acc[..., 0, :].copy()
        for j in range(1, acc.shape[-2]):
            total = total + acc[..., j, :]
        acc = total
    return acc


noise = np.random.default_rng(0).standard_normal((n, 4099)).astype(np.float32)
noise_in = global_array(noise)
for topo in topologies:
    # Integer-valued data: every sum exact. Random floats: the plan's order, bitwise.
    for got in rows(spmd(lambda v, t=topo: jax_ddl.psum(v, "i", topology=t))(x)):
        np.testing.assert_array_equal(got, want, err_msg=f"topology {topo}")
    dims = default if topo is None else tuple(int(d) for d in topo.split("x"))
    for got in rows(spmd(lambda v, t=topo: jax_ddl.psum(v, "i", topology=t))(noise_in)):
        np.testing.assert_array_equal(got, plan_order_sum(noise, dims), err_msg=f"topology {topo}")

# Pipelined chunks (JAX_DDL_CHUNK_BYTES, read when a call is traced): the same bits as one
# chunk, for every topology, in float32 and in bfloat16 (float32 scratch between local
# stages), over several buffers of odd sizes whose chunks straddle buffer boundaries.
os.environ["JAX_DDL_CHUNK_BYTES"] = "1000"
tree_noise = {"a": noise[:, :1237], "b": noise[:, 1237:]}
tree_noise_in = jax.tree_util.tree_map(global_array, tree_noise)
bf = noise.astype(jnp.bfloat16)
bf_in = global_array(bf)
for topo in topologies:
    dims = default if topo is None else tuple(int(d) for d in topo.split("x"))
    # The hierarchy runs where the grid splits at the process boundary: leading dimensions
    # that multiply to the local devices (none with one device per process).
    across = local == 1 or local in np.cumprod(dims).tolist()
    jax_ddl.reset_counters()
    f = spmd(lambda t, tp=topo: jax_ddl.psum(t, "i", topology=tp))
    out = f(tree_noise_in)
    ref = plan_order_sum(noise, dims)
    for got_a, got_b in zip(rows(out["a"]), rows(out["b"])):
        np.testing.assert_array_equal(np.concatenate([got_a, got_b]), ref, err_msg=f"{topo}")
    # 16396 bytes per device in 1000-byte chunks: 17 chunks per device thread, where the
    # grid splits at the process boundary (the hierarchy); other grids run unchunked.
    assert jax_ddl.counters()["chunks"] == (17 * local if across else 0), (topo, jax_ddl.counters())
    del os.environ["JAX_DDL_CHUNK_BYTES"]
    one = spmd(lambda t, tp=topo: jax_ddl.psum(t, "i", topology=tp))(bf_in)
    os.environ["JAX_DDL_CHUNK_BYTES"] = "1000"
    many = f(bf_in)
    for a, b in zip(rows(one), rows(many)):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16), err_msg=f"{topo}")
    del f, out, one, many
del os.environ["JAX_DDL_CHUNK_BYTES"]

# Scratch of a call site: message frames sized by the slices a call sends and receives,
# never by whole buffers (each frame area was once (k - 1) whole regions: 8x the buffer per
# device for the flat spec over 2 processes x 4 devices). Per process, for B bytes per
# device: DDL's hierarchy holds each device's slice (B in all) and frames of at most
# 2 x (procs - 1) / procs of it; a group spanning processes sends and receives at most
# that share of each device's buffer.
B = 1 << 20
ones = global_array(np.ones((n, B // 4), np.float32))
for topo in topologies:
    dims = default if topo is None else tuple(int(d) for d in topo.split("x"))
    f = spmd(lambda v, t=topo: jax_ddl.psum(v, "i", topology=t))
    before = _ddl.resources()["site_bytes"]
    out = f(ones)
    held = _ddl.resources()["site_bytes"] - before
    for got in rows(out):
        assert got[0] == n and got[-1] == n, (topo, got[:4])
    share = 2 * (procs - 1) / procs
    across = local == 1 or local in np.cumprod(dims).tolist()
    bound = B * (1 + share) if across else local * B * share
    assert held <= bound + 64 * 1024, f"topology {topo}: {held} bytes of scratch, bound {bound}"
    del f, out

# A pytree of three dtypes: one call each, all exact.
tree = {
    "f32": glob[:, :500],
    "bf16": glob[:, :300].astype(jnp.bfloat16),
    "i32": glob[:, :700].astype(np.int32),
}
tree_in = jax.tree_util.tree_map(global_array, tree)
out = spmd(lambda t: jax_ddl.psum(t, "i"))(tree_in)
for k, v in tree.items():
    for got in rows(out[k]):
        np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(v, np.float64).sum(0))

# pmean against jax.lax.pmean (n is a power of two here or the values stay exact).
mean_ddl = rows(spmd(lambda v: jax_ddl.pmean(v, "i"))(x))
mean_lax = rows(spmd(lambda v: jax.lax.pmean(v, "i"))(x))
for a, b in zip(mean_ddl, mean_lax):
    np.testing.assert_allclose(a, b, rtol=1e-6)


# grad through jax_ddl.psum equals grad through jax.lax.psum.
def loss(psum):
    def f(w, v):
        return jnp.sum(psum(w * v, "i") ** 2)

    return spmd(jax.grad(f), out_specs=P("i"))


w = global_array(np.ones_like(glob) * 0.5)
for a, b in zip(rows(loss(jax_ddl.psum)(w, x)), rows(loss(jax.lax.psum)(w, x))):
    np.testing.assert_allclose(a, b, rtol=1e-6)

# Inside each process: a (process, local) mesh reduced over "local" (shared memory only).
grid = Mesh(np.array(jax.devices()).reshape(procs, local), ("proc", "local"))
y = global_array(glob, grid, P(("proc", "local")))


def grid_psum(axis, out_spec):
    """jax_ddl.psum over one axis of the (proc, local) mesh."""
    return jax.jit(
        jax.shard_map(
            lambda v: jax_ddl.psum(v, axis),
            mesh=grid,
            in_specs=P(("proc", "local")),
            out_specs=out_spec,
        )
    )


inside = grid_psum("local", P("proc"))(y)
for got in rows(inside):
    np.testing.assert_array_equal(got, glob[rank * local : (rank + 1) * local].sum(0))

# Over "proc" only: ranks in different processes but not all devices: refused clearly
# (with one device per process "proc" is every device: the whole sum).
over_proc = grid_psum("proc", P("local"))
if local == 1:
    for got in rows(over_proc(y)):
        np.testing.assert_array_equal(got, want)
else:
    try:
        over_proc(y)
    except NotImplementedError as e:
        # Caught at trace time when the axis is larger than a process, else at lowering.
        assert "mixes processes" in str(e) or "over all devices of all processes" in str(e), e
    else:
        raise AssertionError("a reduction over some devices of several processes was accepted")

sys.stdout.write(f"OK {rank}\n")
sys.stdout.flush()
