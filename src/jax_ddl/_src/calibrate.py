"""python -m jax_ddl.calibrate: measures the cost model's terms on this machine and launch.

Run it the way the job runs: one process (`--devices N` host devices), or under mpiexec
with the same processes, devices and hosts. Every process measures at the same time (as
the allreduce works), and the profile keeps the slowest process's value of each term
(the overlap: the median over processes):

- memory copy bandwidth of one process's device threads (reads + writes per second);
- reduction throughput of the engine's kernel per dtype (4 sources into 1), and for
  float32 per shape of a stage in shared memory (p sources into 1, or into every local
  device's output);
- per level, latency and bandwidth of the messages between processes: `host` (processes
  of one host with each other, every one sending to every other) and `network` (every
  process with the same process of the next host); bandwidth per host, all processes at
  once, per message size, with one message per device slot to each peer at once on its
  own communicator as the engine sends (concurrent messages over TCP cost more than one
  large one here); between hosts also in the flat plan's pattern (every device slot to
  every device slot of every process on the other hosts: more messages in flight move
  more per poll of MPI);
- how far memory work and messages overlap: copies on every device thread while the
  slowest level's exchange runs, against each alone (1: the pair takes as long as the
  longer, 0: their sum; on few cores the network stack and the memory work compete);
- the fixed cost of one jax_ddl call: an 8-byte call of the default grid, less the
  latencies and barriers the model charges that call itself (jax_ddl.model.fixed_cost);
- one shared-memory stage (a barrier): one process only, from 64 KiB calls of a
  2-dimensional and the flat grid (the built-in 20 us under mpiexec);
- page faults of fresh output buffers: an XLA add on every local device into a fresh
  output against a donated one, per size (seconds per byte of fresh output).

Writes a JSON profile (`--out`) for jax_ddl.model, `JAX_DDL_PROFILE` and
`topology="auto"`, and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time

MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jax_ddl.calibrate",
        description="Measure jax_ddl's cost-model terms on this machine and launch.",
    )
    p.add_argument("--out", default="jax_ddl_profile.json", help="profile JSON to write")
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="host CPU devices when XLA_FLAGS does not set them (under mpiexec: per process)",
    )
    p.add_argument(
        "--fault-sizes",
        default="1M,4M,16M,64M",
        help="bytes per device at which to measure fresh-output page faults",
    )
    p.add_argument(
        "--message-sizes",
        default="64K,256K,512K,1M,2M,4M",
        help="bytes per message at which to measure the links (one message per device slot "
        "to each peer at once, as the engine sends; between hosts also in the flat plan's "
        "pattern, sizes up to 64 MiB in flight per process)",
    )
    p.add_argument("-n", "--iters", type=int, default=9, help="timed repetitions per term")
    args = p.parse_args(argv)
    from jax_ddl._src.bench import parse_size

    try:
        args.fault_sizes = [parse_size(s) for s in args.fault_sizes.split(",") if s.strip()]
        args.message_sizes = [parse_size(s) for s in args.message_sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


class World:
    """The launch: MPI when there are several processes, else a world of one."""

    def __init__(self):
        import jax

        self.procs = jax.process_count()
        self.rank = jax.process_index()
        self.comm = None
        if self.procs > 1:
            from mpi4py import MPI

            self.MPI = MPI
            self.comm = MPI.COMM_WORLD

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    def gather(self, value):
        return self.comm.allgather(value) if self.comm is not None else [value]


def _timed(world, fn, iters):
    """Median seconds of fn() over iters, every process starting together."""
    out = []
    for _ in range(iters):
        world.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def memory_terms(world, devices: int, iters: int) -> tuple[float, dict]:
    from jax_ddl import _ddl

    world.barrier()
    copy = _ddl.copy_bandwidth(32 * MiB, devices, iters)
    reduce = {}
    for dtype in ("float32", "bfloat16", "float16", "float64", "int32", "int64"):
        world.barrier()
        reduce[dtype] = _ddl.reduce_bandwidth(dtype, 8 * MiB, 4, devices, max(3, iters // 2))
    copies = world.gather(copy)
    reduces = world.gather(reduce)
    return min(copies), {k: min(r[k] for r in reduces) for k in reduce}


def shape_terms(world, devices: int, iters: int) -> dict:
    """{(sources, destinations): float32 reads + writes per second} for the shapes of the
    stages in shared memory: p copies into one partial result, and at the last stage into
    every one of the `devices` outputs, p = 2, 8 and the devices' count (those up to it)
    and 4 (the model's reference); buffers of 4 MiB, or smaller so that one process's
    buffers of a shape stay within 512 MiB; one thread per device, every process at once."""
    from jax_ddl import _ddl

    if devices < 2:
        return {}
    # 4 into 1 always: the reference the model scales the others by.
    counts = sorted({4} | {p for p in (2, 8, devices) if p <= devices})
    out = {}
    for p in counts:
        for q in sorted({1, devices}):
            world.barrier()
            size = max(256 << 10, min(4 * MiB, (512 * MiB) // ((p + q) * devices)))
            rate = _ddl.reduce_bandwidth("float32", size, p, devices, max(3, iters // 2), q)
            out[(p, q)] = min(world.gather(rate))
    return out


def overlap_term(
    world, make_exchange, t_exchange: float, devices: int, copy_Bps: float, iters: int
) -> float:
    """How far memory work and messages overlap in this launch, 0..1: memory work (numpy
    copies, which release the GIL, on one thread per device) runs while the main thread
    keeps exchanging (polling as the engine does). With s_copy and
    s_msg the speeds of each under the other against alone, w = s_copy + s_msg - 1: 1 when
    neither slows the other (a link that paces itself), 0 when they split one resource
    (the network stack and the memory work on the same cores)."""
    import threading

    import numpy as np

    block = 16 * MiB
    passes = max(2, round(copy_Bps * max(t_exchange, 0.02) * 4 / (2 * devices * block)))
    bufs = [(np.ones(block, np.uint8), np.zeros(block, np.uint8)) for _ in range(devices)]

    ends = [0.0] * devices

    def work(i, src, dst):
        for _ in range(passes):
            np.copyto(dst, src)
        ends[i] = time.perf_counter()

    def copies():
        threads = [threading.Thread(target=work, args=(i, *b)) for i, b in enumerate(bufs)]
        for t in threads:
            t.start()
        return threads

    exchange = make_exchange()
    for t in copies():  # the buffers' pages touched outside the timing
        t.join()
    alone, together, s_msg = [], [], []
    for _ in range(max(3, iters)):
        world.barrier()
        t0 = time.perf_counter()
        for t in copies():
            t.join()
        alone.append(time.perf_counter() - t0)
        # Every process runs as many exchanges (peers must match them) as the copies
        # took alone, while its copies run again.
        count = max(1, round(max(world.gather(alone[-1])) / t_exchange))
        world.barrier()
        t0 = time.perf_counter()
        threads = copies()
        for _ in range(count):
            exchange()
        t_msg = time.perf_counter() - t0
        for t in threads:
            t.join()
        together.append(max(ends) - t0)
        s_msg.append(count * t_exchange / t_msg)
    # Medians of the times, not of per-repetition ratios (a ratio of two noisy times is
    # noisier than either); neither side can gain from the other.
    s_copy = min(1.0, statistics.median(alone) / statistics.median(together))
    w = s_copy + min(1.0, statistics.median(s_msg)) - 1
    # The processes do the same work: the median over them (on a shared machine the
    # smallest of several noisy estimates is biased low; with the smallest, two calibrations
    # of one launch minutes apart gave 0.07 and 0.61).
    return min(1.0, max(0.0, statistics.median(world.gather(w))))


# Sweeps through a level's measurements that each point's repetitions are spread over.
ROUNDS = 3

# How often a process polls MPI while its pipelined exchanges wait: each waiting device
# thread sleeps up to kPollEvery x the number of threads sleeping (PollCap in
# ffi/cpu_handler.cc), so the process as a whole polls about every kPollEvery.
POLL_MAX_S = 100e-6


def _wait_like_the_engine(reqs, sleep=time.sleep) -> None:
    """Waits for `reqs` polling about as a process of the engine polls while its pipelined
    exchanges travel: every pending request tested on its own (MPI_Test, as each device
    thread's sweep tests its slot's requests), and when none completed a sleep of 5 us
    doubling up to POLL_MAX_S, back to 5 us after a completion. (One thread here tests
    every slot's requests, so it makes more MPI_Test calls per poll than any one engine
    thread; the flat plan's MpiCall::Wait sleeps up to 200 us.)

    MPICH moves TCP data only while it is called, so how a wait polls sets how fast
    messages go: a blocking MPI_Waitall measures faster links than the engine sees, and
    one thread sleeping up to 1 ms measured 1-2 MiB messages 10x slower than the engine
    moved them. Each MPI_Test of an incomplete request drives MPICH's progress once, so
    testing the requests one by one moves more per poll than one MPI_Testsome over all of
    them: at 10 Gbit/s, 0.5-2 MiB messages 0.38-0.49 against 0.23-0.31 GB/s per host side
    by side (docs/model.md)."""
    pending = list(reqs)
    pause = 5e-6
    while pending:
        still = [r for r in pending if not r.Test()]
        if len(still) < len(pending):
            pending = still
            pause = 5e-6
        else:
            sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)


def link_terms(
    world,
    placement,
    sizes,
    iters: int,
    devices: int = 1,
    copy_Bps: float = 0.0,
    cap: int = 16 * MiB,
) -> dict:
    """{"host": (latency, bandwidth, curve, streams), "network": (...), "network_fan":
    (...), "overlap": w} for the levels this launch has. Messages go as the engine sends
    them: one per device slot to each peer at once, each slot on its own duplicate of
    MPI_COMM_WORLD, so the curve (bytes per message -> bytes per second per host)
    includes what concurrent messages cost; streams: the messages each process has in
    flight. "network_fan" is the flat plan's pattern between hosts (every slot to every
    slot of every process on the other hosts), measured where it differs from the ring's.
    The overlap is measured against the slowest level."""
    import numpy as np

    if world.comm is None:
        return {}
    comm = world.comm
    comms = [comm.Dup() for _ in range(devices)]
    hosts, per_host = placement.hosts, placement.processes_per_host
    host, local = divmod(world.rank, per_host)
    out = {}
    slowest = None

    def exchange(peers, size, k, fan=False):
        """A maker of one exchange, run once (connections set up outside the timing): k
        messages of `size` bytes to and from every peer at once, one per device slot on
        its comm; with `fan`, k * k (every slot to every slot of the peer, on the
        receiving slot's comm and tagged with the sender's, as the flat plan sends)."""
        pairs = (
            [(a, 100 + b) for a in range(k) for b in range(k)]
            if fan
            else [(a, 7) for a in range(k)]
        )
        send = [np.ones(max(1, size), np.uint8) for _ in pairs]
        recvs = [[np.empty(max(1, size), np.uint8) for _ in pairs] for _ in peers]

        def make():
            def run():
                reqs = []
                for bufs, (src, _) in zip(recvs, peers):
                    reqs += [comms[c].Irecv(b, source=src, tag=t) for b, (c, t) in zip(bufs, pairs)]
                for _, dst in peers:
                    reqs += [comms[c].Isend(b, dest=dst, tag=t) for b, (c, t) in zip(send, pairs)]
                _wait_like_the_engine(reqs)

            return run

        make()()
        return make

    def measure(points):
        """(seconds, maker) of one exchange per (peers, size, k, fan) point: the median of
        its repetitions in each process, the slowest process's. The repetitions are spread
        over ROUNDS sweeps through all the points, so that a few seconds of a slower
        machine (its speed swings within a minute here) shift every point a little rather
        than one point a lot, and the points that the model compares (DDL's pattern and
        the flat plan's) see the same machine."""
        makers = [exchange(*pt) for pt in points]
        runs = [make() for make in makers]
        times = [[] for _ in points]
        per = max(1, math.ceil(iters / ROUNDS))
        for _ in range(ROUNDS):
            for run, out_times in zip(runs, times):
                for _ in range(per):
                    world.barrier()
                    t0 = time.perf_counter()
                    run()
                    out_times.append(time.perf_counter() - t0)
        return [(max(world.gather(statistics.median(t))), m) for t, m in zip(times, makers)]

    def curve_sizes(peers, k, limit):
        """The message sizes measured: up to `limit` bytes in flight per process (at least
        the smallest)."""
        out = [m for m in sizes if m * k * len(peers) <= limit]
        return out or sizes[:1]

    def result(latency, measured, host_messages, streams):
        """(latency, bandwidth, curve, messages in flight per process) from (size, (seconds,
        maker)) pairs; `host_messages`: messages one host sends in one exchange."""
        curve = [(m, host_messages * m / max(t - latency, 1e-9)) for m, (t, _) in measured]
        return (latency, curve[-1][1], curve, streams)

    if hosts > 1:
        nxt = ((host + 1) % hosts) * per_host + local
        prv = ((host - 1) % hosts) * per_host + local
        ring = [(prv, nxt)]
        # The flat plan's pattern: every slot to every slot of every process of the other
        # hosts at once, measured in the same sweeps as DDL's.
        far = [(q, q) for q in range(hosts * per_host) if q // per_host != host]
        ring_sizes = curve_sizes(ring, devices, cap)
        fan_sizes = []
        if len(far) * devices * devices > devices:  # else the same pattern as DDL's
            fan_sizes = curve_sizes(far, devices * devices, 4 * cap)
        fan_points = [(far, 8, devices, True)] if fan_sizes else []
        fan_points += [(far, m, devices, True) for m in fan_sizes]
        got = measure([(ring, 8, 1)] + [(ring, m, devices) for m in ring_sizes] + fan_points)
        latency = got[0][0]
        ring_got = list(zip(ring_sizes, got[1 : 1 + len(ring_sizes)]))
        out["network"] = result(latency, ring_got, per_host * devices, devices)
        slowest = ring_got[-1][1]
        if fan_sizes:
            # Its own latency: 8 bytes in its pattern (every message costs CPU time).
            fan_got = got[1 + len(ring_sizes) :]
            out["network_fan"] = result(
                fan_got[0][0],
                list(zip(fan_sizes, fan_got[1:])),
                per_host * len(far) * devices**2,
                devices * devices * len(far),
            )
    if per_host > 1:
        mates = [(q, q) for q in range(host * per_host, (host + 1) * per_host) if q != world.rank]
        mate_sizes = curve_sizes(mates, devices, cap)
        got = measure([(mates, 8, 1)] + [(mates, m, devices) for m in mate_sizes])
        mate_got = list(zip(mate_sizes, got[1:]))
        out["host"] = result(
            got[0][0], mate_got, per_host * len(mates) * devices, devices * len(mates)
        )
        if "network" not in out:
            slowest = mate_got[-1][1]
    if copy_Bps > 0 and slowest is not None:
        out["overlap"] = overlap_term(world, slowest[1], slowest[0], devices, copy_Bps, iters)
    return out


def _mesh_fn(body, donate: bool):
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("i",))
    fn = jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=False)
    return jax.jit(fn, donate_argnums=(0,) if donate else ()), mesh


def _input(mesh, count: int):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devs = [d for d in jax.devices() if d.process_index == jax.process_index()]
    n = len(jax.devices())
    shards = [jax.device_put(np.zeros((1, count), np.float32), d) for d in devs]
    return jax.make_array_from_single_device_arrays((n, count), NamedSharding(mesh, P("i")), shards)


def _call_time(world, nbytes: int, topology, iters: int) -> float:
    import jax

    from jax_ddl._src.collectives import allreduce

    fn, mesh = _mesh_fn(lambda v: allreduce(v, "i", topology=topology), donate=True)
    x = _input(mesh, max(1, nbytes // 4))
    for _ in range(3):
        x = jax.block_until_ready(fn(x))
    times = []
    for _ in range(max(iters, 10)):
        world.barrier()
        t0 = time.perf_counter()
        x = jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return max(world.gather(statistics.median(times)))


def fault_terms(world, sizes, iters: int) -> list:
    """[(bytes per device, seconds per fresh byte)]: x + 1 into a fresh output on every
    local device, against the same into a donated (reused) buffer."""
    import jax

    devs = [d for d in jax.devices() if d.process_index == jax.process_index()]
    out = []
    for size in sizes:
        count = max(1, size // 4)
        per = {}
        for donate in (False, True):
            f = jax.jit(lambda x: x + 1.0, donate_argnums=(0,) if donate else ())
            xs = [jax.device_put(jax.numpy.zeros(count, "float32"), d) for d in devs]
            for _ in range(2):
                ys = [f(x) for x in xs]
                jax.block_until_ready(ys)
                xs = ys if donate else xs
            times = []
            for _ in range(iters):
                world.barrier()
                t0 = time.perf_counter()
                ys = [f(x) for x in xs]
                jax.block_until_ready(ys)
                times.append(time.perf_counter() - t0)
                xs = ys if donate else xs
                del ys
            per[donate] = max(world.gather(statistics.median(times)))
            del xs
        out.append((count * 4, max(0.0, per[False] - per[True]) / (count * 4 * len(devs))))
    return out


def calibrate(args) -> dict:
    import jax

    from jax_ddl._src import model as M
    from jax_ddl._src import topology as T

    world = World()
    devices = jax.local_device_count()
    placement = T.placement(jax.device_count())  # as topology="auto" will see this launch
    started = time.perf_counter()
    copy, reduce = memory_terms(world, devices, args.iters)
    shapes = shape_terms(world, devices, args.iters)
    links = link_terms(world, placement, args.message_sizes, args.iters, devices, copy)
    overlap = links.pop("overlap", 1.0)
    fan = links.pop("network_fan", None)
    # The default grid, whatever JAX_DDL_TOPOLOGY says.
    call = _call_time(world, 8, T.default_dims(jax.device_count()), args.iters)
    barrier = 20e-6
    barrier_note = "built-in (not measured across processes)"
    if world.procs == 1 and devices >= 4:
        dims = T.default_dims(devices)
        two = (2, devices // 2) if devices % 2 == 0 else None
        if two:
            flat = _call_time(world, 64 << 10, dims, args.iters)
            staged = _call_time(world, 64 << 10, two, args.iters)
            barrier = max(0.0, staged - flat)
            barrier_note = "measured: 64 KiB calls, grid 2x%d against %d" % (devices // 2, devices)
    faults = fault_terms(world, args.fault_sizes, args.iters)
    net_defaults = M.default_profile().links
    profile = M.Profile(
        copy_Bps=copy,
        reduce_Bps=reduce,
        reduce_shapes=shapes,
        call_s=call,
        barrier_s=barrier,
        overlap=overlap,
        links={k: M.Link(v[0], v[1], tuple(v[2]), v[3]) for k, v in links.items()},
        faults=faults,
        placement=placement,
        meta={
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m jax_ddl.calibrate", *sys.argv[1:]]),
            "processes": world.procs,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "barrier": barrier_note,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    if fan is not None:
        profile.links["network"] = dataclasses.replace(
            profile.links["network"],
            fan_curve=tuple(fan[2]),
            fan_streams=fan[3],
            fan_latency_s=fan[0],
        )
    # Levels this launch does not have keep the built-in terms, marked as such.
    for level in M.LEVELS:
        if level not in profile.links:
            profile.links[level] = net_defaults[level]
            profile.meta.setdefault("not_measured", []).append(level)
    profile.meta["call_measured_s"] = call
    profile.call_s = M.fixed_cost(call, placement, profile)
    return profile


def table(profile) -> str:
    lines = [
        f"# jax_ddl profile: placement {profile.placement.label()} (hosts x processes per "
        f"host x devices per process), {profile.meta.get('cpus')} cpus, "
        f"{profile.meta.get('seconds')} s",
        "  memory copy (per process, all its devices' threads)   "
        f"{profile.copy_Bps / 1e9:8.2f} GB/s",
    ]
    for k, v in profile.reduce_Bps.items():
        lines.append(f"  reduction {k:<9} (4 sources -> 1, reads+writes)     {v / 1e9:8.2f} GB/s")
    for (p, q), v in sorted(profile.reduce_shapes.items()):
        lines.append(
            f"  reduction float32   ({p} sources -> {q}, <= 4 MiB buffers)  {v / 1e9:8.2f} GB/s"
        )
    missing = profile.meta.get("not_measured", [])
    for level, link in profile.links.items():
        note = "  (built-in: not in this launch)" if level in missing else ""
        lines.append(
            f"  link {level:<8} latency {link.latency_s * 1e6:9.1f} us   bandwidth "
            f"{link.bandwidth_Bps / 1e9:8.3f} GB/s per host{note}"
        )
        for m, bw in link.curve:
            lines.append(
                f"       {m / 1024:8.0f} KiB messages, one per device slot to each peer: "
                f"{bw / 1e9:8.3f} GB/s per host"
            )
        if link.fan_latency_s > 0:
            lines.append(
                f"       latency with {link.fan_streams} messages per process (flat plan's "
                f"pattern): {link.fan_latency_s * 1e6:9.1f} us"
            )
        for m, bw in link.fan_curve:
            lines.append(
                f"       {m / 1024:8.0f} KiB messages, {link.fan_streams} per process (flat "
                f"plan's pattern): {bw / 1e9:8.3f} GB/s per host"
            )
    measured = profile.meta.get("call_measured_s")
    if measured is not None:
        lines.append(
            f"  one call of 8 B per device, default grid              {measured * 1e6:8.1f} us"
        )
    lines.append(
        f"  fixed cost of one call (less its exchanges, barriers) {profile.call_s * 1e6:8.1f} us"
    )
    lines.append(
        f"  overlap of memory work with messages (1: full, 0: none) {profile.overlap:8.2f}"
    )
    lines.append(
        f"  one shared-memory stage                               {profile.barrier_s * 1e6:8.1f} us"
        f"  ({profile.meta.get('barrier')})"
    )
    for size, v in profile.faults:
        lines.append(
            f"  fresh output pages at {size / MiB:6.1f} MiB per device          "
            f"{v * 1e9 * 4096 / 1e3:8.2f} us per 4 KiB page"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jax_ddl._src.bench import start_devices

    start_devices(args.devices)
    import jax

    profile = calibrate(args)
    if jax.process_index() == 0:
        profile.save(args.out)
        print(table(profile))
        print(f"# written to {args.out}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
