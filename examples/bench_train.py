"""Side-by-side train-step benchmark: jax_ddl.pmean against jax.lax.pmean.

Both train steps are compiled from the same model and state and run alternately (ddl, lax,
ddl, lax, ...) on the same batch, so machine noise falls on both alike. Reports the median
step time, images/s, and for jax_ddl the time its handler spent per step (from its
counters: waiting for every device to arrive, reduce-scatter, broadcast), all per device.

    python examples/bench_train.py --model resnet50 --image-size 32 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from resnet import input_pipeline as data
from resnet import models
from resnet import train as training
from resnet.main import ddl_seconds


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
    p.add_argument("--host-devices", type=int, default=8)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    jax.config.update("jax_num_cpu_devices", args.host_devices)
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
    modes = ("ddl", "lax")
    steps = {
        m: training.make_train_step(model, tx, mesh, allreduce=m, num_classes=args.num_classes)
        for m in modes
    }
    states = {m: training.replicate(host_state, mesh) for m in modes}
    times = {m: [] for m in modes}
    ddl_s, wait_s = [], []
    compile_s = {}
    for i in range(args.warmup + args.steps):
        for m in modes:
            c0, w0 = ddl_seconds(), ddl_seconds("wait")
            t0 = time.perf_counter()
            states[m], metrics = steps[m](states[m], *batch)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            if i == 0:
                compile_s[m] = dt
            if i >= args.warmup:
                times[m].append(dt)
                if m == "ddl":
                    ddl_s.append((ddl_seconds() - c0) / jax.local_device_count())
                    wait_s.append((ddl_seconds("wait") - w0) / jax.local_device_count())
    med = {m: float(np.median(times[m])) for m in modes}
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "global_batch": args.batch_size,
        "devices": n_dev,
        "per_device_batch": args.batch_size // n_dev,
        "params_m": training.param_count(host_state.params) / 1e6,
        "steps": args.steps,
        "step_time_s": med,
        "images_per_s": {m: args.batch_size / med[m] for m in modes},
        "step_time_iqr_s": {
            m: [float(np.percentile(times[m], 25)), float(np.percentile(times[m], 75))]
            for m in modes
        },
        "ddl_in_step_s": float(np.median(ddl_s)),
        "ddl_share": float(np.median(ddl_s)) / med["ddl"],
        "ddl_wait_s": float(np.median(wait_s)),
        "lax_over_ddl": med["lax"] / med["ddl"],
        "first_step_s": compile_s,
        "jax": jax.__version__,
    }
    print(
        f"{args.model} {args.image_size}x{args.image_size}, global batch {args.batch_size} "
        f"({result['per_device_batch']}/device) on {n_dev} {jax.devices()[0].platform} "
        f"devices; {args.steps} timed steps each, alternating"
    )
    print(
        f"{'allreduce':>10} {'step ms (median)':>17} {'IQR ms':>15} {'images/s':>9} "
        f"{'in jax_ddl':>16}"
    )
    for m in modes:
        lo, hi = result["step_time_iqr_s"][m]
        share = (
            f"{result['ddl_in_step_s'] * 1e3:7.1f} ms {result['ddl_share']:5.1%}"
            if m == "ddl"
            else ""
        )
        print(
            f"{m:>10} {med[m] * 1e3:17.1f} {lo * 1e3:7.1f}-{hi * 1e3:<7.1f} "
            f"{result['images_per_s'][m]:9.1f} {share:>16}"
        )
    print(
        f"lax time / ddl time: {result['lax_over_ddl']:.3f}; of the time in jax_ddl, "
        f"{result['ddl_wait_s'] * 1e3:.1f} ms is waiting for the slowest device to arrive"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
