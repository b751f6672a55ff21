"""Run under mpiexec by tests/test_multiprocess.py: N processes x L host devices each.

Checks, on every process: jax_ddl.distributed.initialize's layout; jax.lax.psum across
processes (XLA's gloo) against numpy of the global data; jax_ddl.psum over a mesh axis
inside each process, exact; jax_ddl.psum over an axis spanning processes refused at trace
time with a message naming the devices. Prints "OK <rank>" at the end.
"""

import sys

import jax_ddl.distributed

local = int(sys.argv[1])
info = jax_ddl.distributed.initialize(local_devices=local)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ddl  # noqa: E402

rank, procs = info["process_index"], info["process_count"]
assert (jax.process_index(), jax.process_count()) == (rank, procs), info
assert jax.local_device_count() == local and jax.device_count() == local * procs
assert info["hosts"] == 1 and info["processes_per_host"] == procs

n = local * procs
# Integer-valued data, different on every device: row g (global device g) is g+1 times a
# pattern, so every sum is exact in float32.
pattern = np.arange(1000, dtype=np.float32) % 7 - 3
glob = np.stack([(g + 1) * pattern for g in range(n)])
mine = glob[rank * local : (rank + 1) * local]

flat = Mesh(np.array(jax.devices()), ("i",))
x = jax.make_array_from_process_local_data(NamedSharding(flat, P("i")), mine, glob.shape)
lax_sum = jax.jit(
    jax.shard_map(lambda v: jax.lax.psum(v, "i"), mesh=flat, in_specs=P("i"), out_specs=P())
)(x)
np.testing.assert_array_equal(np.asarray(lax_sum.addressable_shards[0].data)[0], glob.sum(0))

# jax_ddl inside each process: a (process, local) mesh, reduced over "local".
grid = Mesh(np.array(jax.devices()).reshape(procs, local), ("proc", "local"))
y = jax.make_array_from_process_local_data(
    NamedSharding(grid, P(("proc", "local"))), mine, glob.shape
)
ddl_local = jax.jit(
    jax.shard_map(
        lambda v: jax_ddl.psum(v, "local"),
        mesh=grid,
        in_specs=P(("proc", "local")),
        out_specs=P("proc"),
    )
)(y)
want = glob[rank * local : (rank + 1) * local].sum(0)
for shard in ddl_local.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data)[0], want)

# Across processes: refused before anything runs.
try:
    jax.jit(
        jax.shard_map(lambda v: jax_ddl.psum(v, "i"), mesh=flat, in_specs=P("i"), out_specs=P())
    )(x)
except NotImplementedError as e:
    assert f"span {n} devices but this process has {local}" in str(e), e
else:
    raise AssertionError("jax_ddl.psum across processes was not refused")

sys.stdout.write(f"OK {rank}\n")
sys.stdout.flush()
