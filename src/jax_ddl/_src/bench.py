"""nccl-tests-style allreduce benchmark: jax_ddl beside jax.lax in one run.

For each size: a correctness call per implementation and mode (counted wrong elements),
then timed calls interleaved across implementations so machine noise hits them alike.
Out-of-place: the input stays live, outputs are fresh buffers. In-place: the input is
donated and the output aliases it. Reports median time, algbw = S/t, busbw = algbw *
2(n-1)/n, and the ratio of the physical bound 2*n*S/B (B: copy bandwidth measured in the
same run) to the measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DTYPES = ["float32", "float64", "bfloat16", "float16", "int32", "int64"]
MPI_DTYPES = ["float32", "float64", "int32", "int64"]
OPS = ["sum", "max", "min"]


def parse_size(text: str) -> int:
    """ "4K" -> 4096, "256M" -> 268435456, "8" -> 8."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text.strip() else ""
    unit = t[-1:] if t[-1:] in SIZE_SUFFIXES and t[-1:] else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number) * SIZE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (examples: 8, 4K, 16M, 1G)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1 byte; got {text!r}")
    return int(value)


IMPLS = ("jax_ddl", "ddl-flat", "lax.psum", "mpi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jax_ddl.bench",
        description="Allreduce benchmark in the nccl-tests style: jax_ddl vs jax.lax.psum.",
    )
    p.add_argument(
        "-b",
        "--minbytes",
        type=parse_size,
        default=parse_size("8"),
        help="smallest size per device (default 8)",
    )
    p.add_argument(
        "-e",
        "--maxbytes",
        type=parse_size,
        default=parse_size("256M"),
        help="largest size per device (default 256M)",
    )
    p.add_argument(
        "-f",
        "--stepfactor",
        type=float,
        default=2.0,
        help="multiply the size by this between rows (default 2)",
    )
    p.add_argument("-d", "--datatype", choices=DTYPES, default="float32")
    p.add_argument("-o", "--op", choices=OPS, default="sum")
    p.add_argument("-n", "--iters", type=int, default=20, help="timed calls per variant")
    p.add_argument("-w", "--warmup", type=int, default=3, help="untimed calls per variant")
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="host CPU devices to create when XLA_FLAGS does not set them (default 8; under "
        "mpiexec: per process)",
    )
    p.add_argument(
        "--topology",
        default=None,
        help='jax_ddl topology, e.g. "2x4", or "auto" (the cost model picks per size); default: '
        "local devices x processes, flat in one process; when it has several dimensions, a flat "
        "jax_ddl row (ddl-flat) runs beside it",
    )
    p.add_argument(
        "--modes", default="oop,ip", help="comma list of oop (out-of-place), ip (in-place)"
    )
    p.add_argument(
        "--impls",
        default=None,
        help="comma list of the rows to run among " + ", ".join(IMPLS) + " (default: every "
        "one that applies; x lax needs lax.psum)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all rows and settings as JSON")
    args = p.parse_args(argv)
    if args.minbytes > args.maxbytes:
        p.error(f"--minbytes ({args.minbytes}) must not exceed --maxbytes ({args.maxbytes})")
    if args.stepfactor <= 1.0:
        p.error(f"--stepfactor must be > 1; got {args.stepfactor}")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("oop", "ip") for m in modes):
        p.error(f"--modes must list oop and/or ip; got {args.modes!r}")
    args.modes = modes
    if args.impls is not None:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        if not impls or any(i not in IMPLS for i in impls):
            p.error(f"--impls must list some of {', '.join(IMPLS)}; got {args.impls!r}")
        args.impls = impls
    return args


def sizes(lo: int, hi: int, factor: float):
    out, s = [], float(lo)
    while s <= hi * (1 + 1e-9):
        out.append(int(round(s)))
        s *= factor
    return out


class Harness:
    """Builds and runs the benchmarked functions over one mesh."""

    def __init__(self, args):
        import jax
        import numpy as np
        from jax.sharding import Mesh

        self.jax, self.np = jax, np
        self.args = args
        self.devices = jax.devices()
        self.n = len(self.devices)
        self.procs = jax.process_count()
        self.mesh = Mesh(np.array(self.devices), ("i",))
        # This process's rows of the (n, count) input: its devices' positions in the mesh.
        me = jax.process_index()
        self.rows = [i for i, d in enumerate(self.devices) if d.process_index == me]
        if self.rows != list(range(self.rows[0], self.rows[0] + len(self.rows))):
            raise RuntimeError("jax.devices() interleaves processes; expected process-major")

    def function(self, impl: str, mode: str, dtype, op: str):
        import jax

        if impl == "mpi":
            return self.mpi_function(mode, op)
        from jax import lax
        from jax.sharding import PartitionSpec as P

        from jax_ddl._src.collectives import allreduce

        if impl in ("jax_ddl", "ddl-flat"):
            topology = self.args.topology if impl == "jax_ddl" else self.n

            def body(v):
                return allreduce(
                    v,
                    "i",
                    op=op,
                    topology=topology,
                    inplace=(mode == "ip"),
                    api="jax_ddl.bench",
                )
        else:
            reducer = {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin}[op]

            def body(v):
                return reducer(v, "i")

        fn = jax.shard_map(body, mesh=self.mesh, in_specs=P("i"), out_specs=P("i"), check_vma=False)
        return jax.jit(fn, donate_argnums=(0,) if mode == "ip" else ())

    def mpi_function(self, mode: str, op: str):
        """MPI_Allreduce (mpi4py) of one buffer per process, in place or into a new one."""
        from mpi4py import MPI

        comm, mpi_op = MPI.COMM_WORLD, {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]

        def fn(buf):
            if mode == "ip":
                comm.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
                return buf
            out = self.np.empty_like(buf)
            comm.Allreduce(buf, out, op=mpi_op)
            return out

        return fn

    def inputs(self, impl: str, count: int, dtype, pattern: bool):
        """(n, count) array sharded one row per device (for "mpi": this process's one row);
        rank r, element e holds (r + 1) * (e % 7 + 1) when `pattern`, else zeros (timing:
        no denormals, no overflow). Built one row at a time, on its device, so the peak
        host memory is one row in float64 whatever the size."""
        import jax.numpy as jnp

        np = self.np
        jax = self.jax

        def row(r):
            if not pattern:
                return np.zeros((1, count), dtype)
            vals = (r + 1) * (np.arange(count) % 7 + 1).astype(np.float64)
            return np.array(jnp.asarray(vals, dtype)).reshape(1, count)  # a writable copy

        if impl == "mpi":  # MPI_Allreduce in place writes into it
            return np.array(row(jax.process_index())[0])
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sharding = NamedSharding(self.mesh, P("i"))
        shards = [jax.device_put(row(r), self.devices[r]) for r in self.rows]
        return jax.make_array_from_single_device_arrays((self.n, count), sharding, shards)

    def count_wrong(self, y, want) -> int:
        """Elements of this process's rows of `y` that differ from `want` (float64, one row),
        compared one row at a time."""
        np = self.np
        if isinstance(y, np.ndarray):
            return int((y.astype(np.float64) != want).sum())
        return sum(
            int((np.asarray(s.data, np.float64)[0] != want).sum()) for s in y.addressable_shards
        )

    def expected(self, impl: str, count: int, op: str):
        np = self.np
        n = self.procs if impl == "mpi" else self.n
        base = (np.arange(count) % 7 + 1).astype(np.float64)
        if op == "sum":
            return base * (n * (n + 1) / 2)
        return base * (n if op == "max" else 1)


def measure_bandwidth():
    from jax_ddl import _ddl

    threads = os.cpu_count() or 1
    per_thread = max(64 << 20, (512 << 20) // threads)
    return _ddl.copy_bandwidth(per_thread, threads, 5), threads


def run(args, out=sys.stdout):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_ddl._src import topology as _topology
    from jax_ddl._src.collectives import chunk_bytes, small_bytes

    h = Harness(args)
    try:
        grid = _topology.resolve(args.topology, h.n, "jax_ddl.bench", ("i",))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    dtype = jnp.dtype(args.datatype)
    elem = dtype.itemsize
    bw_start, threads = measure_bandwidth()
    if jax.process_index() != 0:  # every process measures; the first one reports
        out = open(os.devnull, "w")
    auto = grid == _topology.AUTO
    impls = ["jax_ddl", "lax.psum"]
    if auto or len(grid) > 1:  # topology-aware: the flat spec on the same devices, to compare
        impls.insert(1, "ddl-flat")
    if h.procs > 1 and args.datatype in MPI_DTYPES:
        # Across processes, also a raw MPI_Allreduce (mpi4py) of one buffer per process:
        # with one device per process, the same bytes jax_ddl and gloo reduce.
        impls.append("mpi")
    if args.impls is not None:
        impls = [i for i in impls if i in args.impls]
        if not impls:
            raise SystemExit(
                f"error: none of --impls {','.join(args.impls)} applies to this run (ddl-flat "
                "needs a topology of several dimensions, mpi several processes)"
            )
    header = {
        "devices": h.n,
        "processes": h.procs,
        "platform": h.devices[0].platform,
        "dtype": args.datatype,
        "op": args.op,
        "topology": "auto" if auto else _topology.format(grid),
        "iters": args.iters,
        "warmup": args.warmup,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "placement": _topology.placement(h.n).label(),
    }
    print(
        "# jax_ddl allreduce benchmark: " + ", ".join(f"{k} {v}" for k, v in header.items()),
        file=out,
    )
    print(
        f"# memory bandwidth (copy, read+write, {threads} threads): {bw_start / 1e9:.2f} GB/s "
        "(start of run)",
        file=out,
    )
    print(
        "# bound% = (2 * n * size / bandwidth) / time; x lax = lax.psum time / this row's time",
        file=out,
    )
    cols = "".join(
        f" | {m:>3} {'time(us)':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>6} {'bound%':>6}"
        for m in args.modes
    )
    if "lax.psum" in impls:
        cols += "".join(f" {'x lax ' + m:>9}" for m in args.modes)
    units = "".join(
        f" | {'':>3} {'':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6} {'':>6}" for _ in args.modes
    )
    print(f"# {'size':>11} {'count':>11} {'type':>8} {'redop':>5} {'impl':>8}{cols}", file=out)
    print(f"# {'(B/device)':>11} {'':>11} {'':>8} {'':>5} {'':>8}{units}", file=out)

    rows = []
    for size in sizes(args.minbytes, args.maxbytes, args.stepfactor):
        count = max(1, size // elem)
        nbytes = count * elem
        fns, state, wrong = {}, {}, {}
        for impl in impls:
            for mode in args.modes:
                fn = h.function(impl, mode, dtype, args.op)
                got = fn(h.inputs(impl, count, dtype, pattern=True))
                wrong[impl, mode] = h.count_wrong(got, h.expected(impl, count, args.op))
                del got
                fns[impl, mode] = fn
                state[impl, mode] = h.inputs(impl, count, dtype, pattern=False)
                for _ in range(args.warmup):
                    y = fn(state[impl, mode])
                    jax.block_until_ready(y)
                    if mode == "ip":
                        state[impl, mode] = y
        times = {k: [] for k in fns}
        for _ in range(args.iters):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                y = fn(state[key])
                jax.block_until_ready(y)
                times[key].append(time.perf_counter() - t0)
                if key[1] == "ip":
                    state[key] = y
                del y
        del state
        med = {k: float(np.median(v)) for k, v in times.items()}
        for impl in impls:
            ranks = h.procs if impl == "mpi" else h.n  # mpi: one buffer per process
            bus = 2 * (ranks - 1) / ranks
            bound_s = 2 * ranks * nbytes / bw_start
            row = {
                "size": nbytes,
                "count": count,
                "type": args.datatype,
                "redop": args.op,
                "impl": impl,
            }
            text = f"  {nbytes:>11} {count:>11} {args.datatype:>8} {args.op:>5} {impl:>8}"
            for mode in args.modes:
                t = med[impl, mode]
                algbw = nbytes / t / 1e9
                row[mode] = {
                    "time_us": t * 1e6,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * bus,
                    "wrong": wrong[impl, mode],
                    "bound_pct": 100 * bound_s / t,
                    "times_us": [x * 1e6 for x in times[impl, mode]],
                }
                text += (
                    f" | {mode:>3} {t * 1e6:>10.1f} {algbw:>7.2f} {algbw * bus:>7.2f} "
                    f"{wrong[impl, mode]:>6} {100 * bound_s / t:>6.1f}"
                )
            if impl != "lax.psum" and "lax.psum" in impls:
                for mode in args.modes:
                    ratio = med["lax.psum", mode] / med[impl, mode]
                    row[mode]["x_lax"] = ratio
                    text += f" {ratio:>9.2f}"
            if impl == "jax_ddl" and auto:
                for mode in args.modes:
                    row[mode]["grid"] = _topology.format(
                        _topology.choose(
                            h.n, nbytes, args.datatype, mode == "ip", chunk_bytes(), small_bytes()
                        )
                    )
                text += "  auto: " + " / ".join(row[m]["grid"] for m in args.modes)
            if impl == "jax_ddl" and "ddl-flat" in impls:
                for mode in args.modes:
                    row[mode]["x_flat"] = med["ddl-flat", mode] / med[impl, mode]
            rows.append(row)
            print(text, file=out, flush=True)
        del fns
    bw_end, _ = measure_bandwidth()
    print(f"# memory bandwidth at end of run: {bw_end / 1e9:.2f} GB/s", file=out)
    if "ddl-flat" in impls:
        ratios = " ".join(
            f"{r['size']}: " + " / ".join(f"{r[m]['x_flat']:.2f}" for m in args.modes)
            for r in rows
            if r["impl"] == "jax_ddl"
        )
        print(
            f"# topology {header['topology']} against flat {h.n} (flat time / jax_ddl time, "
            f"{' / '.join(args.modes)}) by size: {ratios}",
            file=out,
        )
    total_wrong = sum(r[m]["wrong"] for r in rows for m in args.modes)
    for impl in impls:
        avg = [r[m]["busbw_GBps"] for r in rows if r["impl"] == impl for m in args.modes]
        print(f"# {impl}: avg busbw {sum(avg) / len(avg):.3f} GB/s", file=out)
    print(
        f"# out of bounds values: {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}", file=out
    )
    result = {
        "settings": header,
        "bandwidth_Bps": {"start": bw_start, "end": bw_end},
        "command": " ".join(["python -m jax_ddl.bench", *sys.argv[1:]]),
        "rows": rows,
    }
    return result, total_wrong


def start_devices(devices: int) -> None:
    """Under mpiexec: one process per MPI rank with `devices` host devices each (jax and
    jax_ddl's transport started). Else `devices` host devices, unless XLA_FLAGS sets them."""
    from jax_ddl._src import distributed

    if distributed.launched_by_mpiexec():
        distributed.initialize(local_devices=devices)
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={devices}".strip()
            )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.datatype in ("float64", "int64"):
        os.environ.setdefault("JAX_ENABLE_X64", "1")
    start_devices(args.devices)
    result, wrong = run(args)
    import jax

    # Every process times its own calls; the first one reports, in the table and here.
    if args.json and jax.process_index() == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if wrong else 0
