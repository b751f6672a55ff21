"""Run under mpiexec by tests/test_multiprocess.py: a cross-process jax_ddl.psum (over the
topology argv[3] if given, else the default) in which process 1 misbehaves, per argv[1]:

  skip   process 1 never calls it;
  shape  process 1 reduces a different number of elements;
  kill   process 1 is killed (SIGKILL) before calling it.

Every surviving process must fail within JAX_DDL_TIMEOUT with a message naming the
problem; it prints "FAILED <rank> <seconds> <message>" and exits 0.
"""

import os
import signal
import sys
import time

import jax_ddl.distributed

mode, local = sys.argv[1], int(sys.argv[2])
topology = sys.argv[3] if len(sys.argv) > 3 else None
info = jax_ddl.distributed.initialize(local_devices=local)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ddl  # noqa: E402

rank = info["process_index"]
n = jax.device_count()
mesh = Mesh(np.array(jax.devices()), ("i",))
glob = np.ones((n, 4096), np.float32)
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("i")), glob[rank * local : (rank + 1) * local], glob.shape
)
width = 4000 if (mode == "shape" and rank == 1) else 4096
f = jax.jit(
    jax.shard_map(
        lambda v: jax_ddl.psum(v[:, :width], "i", topology=topology),
        mesh=mesh,
        in_specs=P("i"),
        out_specs=P("i"),
    )
)
compiled = f.lower(x).compile()  # compile first: the deadline then covers the call alone
if rank == 1 and mode == "kill":
    time.sleep(1.0)  # mid-run: the others are already waiting in the collective
    os.kill(os.getpid(), signal.SIGKILL)
if rank == 1 and mode == "skip":
    time.sleep(float(os.environ["JAX_DDL_TIMEOUT"]) + 20)  # stays alive, never calls
    sys.exit(0)
t0 = time.monotonic()
try:
    jax.block_until_ready(compiled(x))
except Exception as e:  # noqa: BLE001 - the error itself is what is checked
    message = " ".join(str(e).split())
    sys.stdout.write(f"FAILED {rank} {time.monotonic() - t0:.1f} {message}\n")
    sys.stdout.flush()
    # Peers are gone or broken: skip MPI's and jax's collective shutdown, but give a peer
    # that fails at the same moment time to report (mpiexec may end the job at an exit).
    time.sleep(1.0)
    os._exit(0)
sys.stdout.write(f"SUCCEEDED {rank}\n")
