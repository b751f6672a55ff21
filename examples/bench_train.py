"""Side-by-side train-step benchmark: jax_ddl.pmean against jax.lax.pmean.

The train steps (--modes: ddl, lax, ddl-buckets for jax_ddl.sync_gradients with
--buckets MB, none for the same step with no reduction at all) are compiled from the same
model and state and run alternately on the same batch, so machine noise falls on all
alike. Reports the median step time, images/s, and for jax_ddl the time its handler spent
per step (from its counters: waiting for every device to arrive, reduce-scatter,
broadcast), all per device, summed over calls (with buckets, calls overlap each other, so
the sum can pass the step time: shown as >1x), and the process's CPU time per step. With
`none` among the modes it also reports each mode's exposed communication: its step time
minus that of `none`. With --trace it records the calls (jax_ddl.trace) and says where in
the step they ran.

    python examples/bench_train.py --model resnet50 --image-size 32 --batch-size 256

Under mpiexec every process joins one run (jax_ddl.distributed, --host-devices each) and
the first one reports; every process times its own steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import jax
import numpy as np

import jax_ddl
from resnet import input_pipeline as data
from resnet import models
from resnet import train as training
from resnet.main import ddl_seconds, setup_devices


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="bench_train.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per allreduce")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per allreduce")
    p.add_argument("--host-devices", type=int, default=8, help="per process under mpiexec")
    p.add_argument(
        "--modes",
        default="ddl,lax",
        help="comma-separated: ddl, lax, ddl-buckets, none (no reduction: the baseline)",
    )
    p.add_argument("--buckets", type=float, default=4.0, metavar="MB", help="for ddl-buckets")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="record jax_ddl's calls in the timed steps (jax_ddl.trace) and write them as "
        "Chrome trace events (process i>0 of a launch writes FILE.p<i>); prints per mode "
        "where in the step the calls ran",
    )
    return p.parse_args(argv)


def _union(spans) -> float:
    """Seconds covered by the (start, end) spans (overlapping calls counted once)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def trace_summary(tr, modes) -> dict:
    """Per mode, medians over its timed steps, times from the step's start: when the first
    and the last jax_ddl call started on device 0, how long the step ran on after the last
    call started (what the gradient reduction can still expose), how long device 0 had a
    call running, and how much of that before the last call started (overlapped)."""
    out = {}
    dev = min((e.device for e in tr.events), default=0)
    for m in modes:
        rows = []
        for sp in (s for s in tr.spans if s.name == m):
            evs = [e for e in tr.in_span(sp) if e.device == dev]
            if not evs:
                continue
            last = max(e.start for e in evs)
            busy = _union([(e.start, e.end) for e in evs])
            before = _union([(e.start, min(e.end, last)) for e in evs if e.start < last])
            rows.append(
                (
                    len(evs),
                    min(e.start for e in evs) - sp.start,
                    last - sp.start,
                    sp.end - last,
                    busy,
                    before,
                )
            )
        if rows:
            keys = (
                "calls",
                "first_start_s",
                "last_start_s",
                "tail_s",
                "busy_s",
                "busy_before_last_s",
            )
            out[m] = {k: float(np.median([r[j] for r in rows])) for j, k in enumerate(keys)}
    return out


def main(argv=None) -> int:
    args = parse(argv)
    setup_devices(args.host_devices, "auto")
    mesh = training.global_mesh()
    n_dev = len(mesh.devices.flat)
    if args.batch_size % n_dev:
        print(
            f"bench_train.py: error: --batch-size {args.batch_size} does not divide over "
            f"{n_dev} devices",
            file=sys.stderr,
        )
        return 2
    src = data.SyntheticSource(args.image_size, args.num_classes, pool=args.batch_size)
    stem = "small" if args.image_size <= 64 else "imagenet"
    model = models.create_model(
        args.model, num_classes=args.num_classes, width=args.width, stem=stem
    )
    recipe = training.Recipe(global_batch=args.batch_size, total_steps=1000, warmup_steps=10)
    tx = recipe.optimizer()
    host_state = jax.device_get(training.create_state(model, tx, src.image_shape, 0))
    rows = data.process_rows(args.batch_size, jax.process_index(), jax.process_count())
    batch = training.shard_batch(mesh, *src.load(np.arange(args.batch_size)[rows], 0, True))
    modes = tuple(args.modes.split(","))
    known = ("ddl", "lax", "ddl-buckets", training.NO_REDUCTION)
    if not modes or any(m not in known for m in modes) or len(set(modes)) != len(modes):
        print(
            f"bench_train.py: error: --modes {args.modes!r}: use distinct names from "
            f"{', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    steps = {
        m: training.make_train_step(
            model,
            tx,
            mesh,
            allreduce="ddl" if m == "ddl-buckets" else m,
            num_classes=args.num_classes,
            bucket_bytes=int(args.buckets * 2**20) if m == "ddl-buckets" else 0,
        )
        for m in modes
    }
    states = {m: training.replicate(host_state, mesh) for m in modes}
    times = {m: [] for m in modes}
    cpu_s = {m: [] for m in modes}
    ddl_s = {m: [] for m in modes if m.startswith("ddl")}
    wait_s = {m: [] for m in ddl_s}
    compile_s = {}
    recording = jax_ddl.trace() if args.trace else contextlib.nullcontext()
    with recording as tr:
        for i in range(args.warmup + args.steps):
            for m in modes:
                timed = tr is not None and i >= args.warmup
                with tr.span(m) if timed else contextlib.nullcontext():
                    c0, w0 = ddl_seconds(), ddl_seconds("wait")
                    t0, p0 = time.perf_counter(), time.process_time()
                    states[m], metrics = steps[m](states[m], *batch)
                    jax.block_until_ready(metrics)
                    dt = time.perf_counter() - t0
                    cpu = time.process_time() - p0
                if i == 0:
                    compile_s[m] = dt
                if i >= args.warmup:
                    times[m].append(dt)
                    cpu_s[m].append(cpu)
                    if m in ddl_s:
                        ddl_s[m].append((ddl_seconds() - c0) / jax.local_device_count())
                        wait_s[m].append((ddl_seconds("wait") - w0) / jax.local_device_count())
    med = {m: float(np.median(times[m])) for m in modes}
    in_ddl = {m: float(np.median(v)) for m, v in ddl_s.items()}
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "global_batch": args.batch_size,
        "devices": n_dev,
        "per_device_batch": args.batch_size // n_dev,
        "params_m": training.param_count(host_state.params) / 1e6,
        "steps": args.steps,
        "buckets_mb": args.buckets if "ddl-buckets" in modes else None,
        "step_time_s": med,
        "images_per_s": {m: args.batch_size / med[m] for m in modes},
        "step_time_iqr_s": {
            m: [float(np.percentile(times[m], 25)), float(np.percentile(times[m], 75))]
            for m in modes
        },
        "ddl_in_step_s": in_ddl,
        "ddl_share": {m: in_ddl[m] / med[m] for m in in_ddl},
        "ddl_wait_s": {m: float(np.median(v)) for m, v in wait_s.items()},
        "first_step_s": compile_s,
        "cpu_s": {m: float(np.median(v)) for m, v in cpu_s.items()},
        "jax": jax.__version__,
    }
    if "ddl" in modes and "lax" in modes:
        result["lax_over_ddl"] = med["lax"] / med["ddl"]
    none = training.NO_REDUCTION
    if none in modes:  # the step time a mode adds over the same step without reduction
        result["exposed_s"] = {m: med[m] - med[none] for m in modes if m != none}
    result["processes"] = jax.process_count()
    if tr is not None:
        result["trace"] = trace_summary(tr, modes)
        path = args.trace if jax.process_index() == 0 else f"{args.trace}.p{jax.process_index()}"
        tr.save(path)
    if jax.process_index() != 0:
        return 0
    print(
        f"{args.model} {args.image_size}x{args.image_size}, global batch {args.batch_size} "
        f"({result['per_device_batch']}/device) on {n_dev} {jax.devices()[0].platform} "
        f"devices in {jax.process_count()} process(es); {args.steps} timed steps each, "
        "alternating"
    )
    exposed = result.get("exposed_s", {})
    print(
        f"{'allreduce':>11} {'step ms (median)':>17} {'IQR ms':>15} {'images/s':>9} {'CPU ms':>8} "
        f"{'in jax_ddl':>16}" + (f" {'exposed ms':>11}" if exposed else "")
    )
    for m in modes:
        lo, hi = result["step_time_iqr_s"][m]
        share = ""
        if m in in_ddl:  # calls that overlap (buckets) each count: the sum may pass the step
            pct = in_ddl[m] / med[m]
            share = f"{in_ddl[m] * 1e3:7.1f} ms " + (f"{pct:5.1%}" if pct <= 1 else "  >1x")
        extra = f" {exposed[m] * 1e3:11.1f}" if m in exposed else ""
        print(
            f"{m:>11} {med[m] * 1e3:17.1f} {lo * 1e3:7.1f}-{hi * 1e3:<7.1f} "
            f"{result['images_per_s'][m]:9.1f} {result['cpu_s'][m] * 1e3:8.0f} {share:>16}{extra}"
        )
    if "lax_over_ddl" in result:
        print(
            f"lax time / ddl time: {result['lax_over_ddl']:.3f}; of the time in jax_ddl, "
            f"{result['ddl_wait_s']['ddl'] * 1e3:.1f} ms is waiting for the slowest device to "
            "arrive"
        )
    if tr is not None:
        print(f"calls in the timed steps (process 0; trace written to {args.trace}):")
        for m, row in result["trace"].items():
            print(
                f"{m:>11}: {row['calls']:.0f} calls/step, first starts at "
                f"{row['first_start_s'] * 1e3:.1f} ms, last at {row['last_start_s'] * 1e3:.1f} ms; "
                f"step ends {row['tail_s'] * 1e3:.1f} ms after the last call started; "
                f"{row['busy_s'] * 1e3:.1f} ms with a call running on device 0, "
                f"{row['busy_before_last_s'] * 1e3:.1f} ms of it before the last call started"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
