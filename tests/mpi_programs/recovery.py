"""Run under mpiexec -n 2 by tests/test_multiprocess.py: call identity across processes and
recovery after failures, per argv[1] (argv[2]: local devices per process):

  identity  process 0 first lowers, prints and compiles other jax_ddl functions (its
            lowering history differs from process 1's); then both run one program of
            several independent same-shape calls and a jitted function called twice,
            many times, flat and hierarchical.
  late      process 1 sleeps past the deadline before the first of four calls of one
            jitted psum (inputs scaled by 1, 2, 3, 4).
  slot      one device of process 1 (rank 3) stalls past the deadline before its
            handshake, its other device on time, at the first of four calls (inputs
            scaled by 1, 2, 3, 4).
  topology  the processes give different topologies for one call, then agree.
  chunking  the processes cut one call into different pipeline chunks
            (JAX_DDL_CHUNK_BYTES), then agree.
  short     process 1 sends every data frame one byte short (test-only fault), then not.
  user-init the program starts jax.distributed itself (jax.distributed.initialize with
            the MPI rank as process id, no jax_ddl.distributed); jax_ddl attaches its MPI
            transport at the first call across processes.

Each call's outcome is printed as "CALL <rank> <label> ok|wrong|error <seconds> <message>";
a result is "ok" only if it is exact. Ends with "DONE <rank>".
"""

import os
import sys
import time

import jax_ddl.distributed

mode, local = sys.argv[1], int(sys.argv[2])
if mode == "user-init":
    import jax

    jax.config.update("jax_num_cpu_devices", local)
    rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    address = f"127.0.0.1:{os.environ['COORDINATOR_PORT']}"
    jax.distributed.initialize(address, num_processes=size, process_id=rank)
    info = {"process_index": rank, "process_count": size}
else:
    info = jax_ddl.distributed.initialize(local_devices=local)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ddl  # noqa: E402
from jax_ddl import _ddl  # noqa: E402

rank, procs = info["process_index"], info["process_count"]
n = local * procs
mesh = Mesh(np.array(jax.devices()), ("i",))


def global_array(glob):
    mine = glob[rank * local : (rank + 1) * local]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("i")), mine, glob.shape)


def spmd(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("i"), out_specs=P("i")))


def rows(y):
    return [np.asarray(s.data)[0] for s in y.addressable_shards]


def report(label, fn, want):
    """Runs fn(), prints whether every local row equals `want` exactly."""
    t0 = time.monotonic()
    try:
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        wants = want if isinstance(want, (tuple, list)) else [want]
        good = all(
            np.array_equal(r, w) for out, w in zip(outs, wants, strict=True) for r in rows(out)
        )
        verdict, message = ("ok" if good else "wrong"), ""
    except Exception as e:  # noqa: BLE001 - the error is what is reported
        verdict, message = "error", " ".join(str(e).split())
    print(f"CALL {rank} {label} {verdict} {time.monotonic() - t0:.1f} {message}", flush=True)


pattern = (np.arange(200_003) % 7 - 3).astype(np.float32)  # 800 KB per device
glob = np.stack([(g + 1) * pattern for g in range(n)])
x = global_array(glob)
total = glob.sum(0)

if mode == "identity":
    # The launcher's SIGUSR1 is caught in this process, but its children start with the
    # default action, as if jax_ddl were not there.
    import signal
    import subprocess

    probe = "import signal, sys; sys.exit(signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL)"
    child = subprocess.run([sys.executable, "-c", probe]).returncode
    here = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    print(f"CALL {rank} sigusr1 {'ok' if child == 0 and here else 'wrong'} 0.0", flush=True)
    if rank == 0:  # a different lowering history: process 0 lowers and compiles more first
        for k in range(3):
            extra = spmd(lambda v, k=k: jax_ddl.psum(v * k, "i", topology=str(n)))
            print(extra.lower(x).as_text()[:100], file=sys.stderr)
            extra.lower(x).compile()
    inner = jax.jit(lambda y: jax_ddl.psum(y, "i"))
    for topo in (None, str(n)):

        def body(v, topo=topo):
            calls = [jax_ddl.psum(v * (k + 1) + k, "i", topology=topo) for k in range(4)]
            # jax.lax's own collective (gloo) in the same program.
            return (*calls, inner(v * 2), inner(v * 3), jax.lax.psum(v * 5, "i"))

        f = spmd(body)
        want = [total * (k + 1) + n * k for k in range(4)] + [2 * total, 3 * total, 5 * total]
        # The program's text does not depend on what else the process lowered before.
        import hashlib

        text = f.lower(x).as_text()
        print(f"HLO {rank} {topo or 'default'} {hashlib.sha256(text.encode()).hexdigest()[:16]}")
        for it in range(5):
            report(f"{topo or 'default'}-{it}", lambda f=f: f(x), want)

elif mode in ("late", "slot"):
    f = jax.jit(
        jax.shard_map(
            lambda v, k: jax_ddl.psum(v * k, "i"),
            mesh=mesh,
            in_specs=(P("i"), P()),
            out_specs=P("i"),
        )
    )
    compiled = f.lower(x, 1.0).compile()
    if rank == 1 and mode == "late":
        time.sleep(float(os.environ["LATE_S"]))
    if rank == 1 and mode == "slot":
        _ddl.set_fault("stall", n - 1, int(1000 * float(os.environ["LATE_S"])), 1)
    for k in (1, 2, 3, 4):
        report(f"call{k}", lambda k=k: compiled(x, float(k)), k * total)

elif mode == "topology":
    mine = "2x2" if rank == 0 else "4"
    report("mismatch", lambda: spmd(lambda v: jax_ddl.psum(v, "i", topology=mine))(x), total)
    report("agreed", lambda: spmd(lambda v: jax_ddl.psum(v, "i", topology="2x2"))(x), total)

elif mode == "chunking":
    os.environ["JAX_DDL_CHUNK_BYTES"] = "100000" if rank == 0 else "200000"
    report("mismatch", lambda: spmd(lambda v: jax_ddl.psum(v, "i"))(x), total)
    os.environ["JAX_DDL_CHUNK_BYTES"] = "100000"
    report("agreed", lambda: spmd(lambda v: jax_ddl.psum(v, "i"))(x), total)

elif mode == "user-init":
    report("default", lambda: spmd(lambda v: jax_ddl.psum(v, "i"))(x), total)
    report("flat", lambda: spmd(lambda v: jax_ddl.psum(v, "i", topology=str(n)))(x), total)
    layout = jax_ddl.distributed.layout()
    print(f"CALL {rank} layout {'ok' if layout['hosts'] == 1 else 'wrong'} 0.0", flush=True)

elif mode == "short":
    if rank == 1:
        _ddl.set_fault("short")
    f = spmd(lambda v: jax_ddl.psum(v, "i"))
    report("short", lambda: f(x), total)
    _ddl.set_fault("none")
    # Process 0 saw the short frame at once, process 1 waited for the deadline: meet again
    # (over MPI, outside jax_ddl) before the next call, as a program that retries would.
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
    report("after", lambda: f(x), total)

print(f"DONE {rank}", flush=True)
# Peers may be broken after a failure: skip MPI's and jax's collective shutdown, but give
# the other process time to print first (mpiexec may end the job when one exits).
time.sleep(1.0)
os._exit(0)
