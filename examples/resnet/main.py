"""Command line of the ResNet data-parallel training program (examples/train.py).

    python examples/train.py                      # ResNet-50 on the embedded digits
    python examples/train.py --data-dir ~/imagenet --image-size 224 --batch-size 256
    python examples/train.py --synthetic --image-size 32 --batch-size 256 --steps 20

Run `python examples/train.py --help` for every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

# Nothing that initialises a JAX backend may run before `setup_devices`.
import jax
import jax.numpy as jnp
import numpy as np

import jax_ddl
import jax_ddl.distributed
from resnet import input_pipeline as data
from resnet import models, reporting
from resnet import train as training
from resnet.checkpoints import CheckpointError, Checkpoints


class UsageError(ValueError):
    """Bad command-line input (message names the flag and the fix)."""


USER_ERRORS = (UsageError, data.DataError, CheckpointError)


# Gradient buckets by default across processes (measured, docs/training.md: 2 emulated
# hosts at 1 Gbit/s, ResNet-50, 4 MiB buckets hid 73-81 % of the communication one call
# after the backward pass exposes; 25 MiB buckets 36 %; at 10 Gbit/s one call exposed 1.4 %
# of the step and buckets cost more than they hid); none in one process, where shared
# memory leaves nothing to hide and each bucket's call costs a rendezvous of every device.
BUCKETS_ACROSS_PROCESSES_MB = 4.0


def bucket_mb(args) -> float:
    """--buckets, or its default for this launch (see BUCKETS_ACROSS_PROCESSES_MB)."""
    if args.buckets is not None:
        return args.buckets
    return (
        BUCKETS_ACROSS_PROCESSES_MB if args.allreduce == "ddl" and jax.process_count() > 1 else 0.0
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Data-parallel ResNet training with gradients and BatchNorm statistics "
        "averaged by jax_ddl (or jax.lax, to compare).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    g.add_argument("--width", type=int, default=64, help="filters of the first stage")
    g.add_argument(
        "--stem",
        default="auto",
        choices=("auto", *models.STEMS),
        help="auto: 'small' up to 64x64 images, 'imagenet' above",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="computation dtype (parameters and gradients stay float32)",
    )

    g = p.add_argument_group("data (default: scikit-learn's digits, embedded, no download)")
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--data-dir", help="ImageNet-layout folder: train/<class>/<image>, val/<class>/<image>"
    )
    src.add_argument("--synthetic", action="store_true", help="random images (throughput)")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side in pixels [digits: 8 (native), folder: 224, synthetic: 32]",
    )
    g.add_argument("--num-classes", type=int, default=1000, help="classes of --synthetic")
    g.add_argument(
        "--workers",
        type=int,
        default=data.default_workers(),
        help="decoding threads for --data-dir",
    )

    g = p.add_argument_group("schedule (Goyal et al.: lr = lr-per-256 x batch / 256)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="train steps [synthetic: 20]")
    length.add_argument("--epochs", type=float, help="passes over the data [digits: 5, folder: 90]")
    g.add_argument("--batch-size", type=int, default=64, help="global batch, all devices")
    g.add_argument("--lr", type=float, default=0.1, help="learning rate per 256 images")
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="linear warm-up [10%% of the steps, at most 5 epochs]",
    )
    g.add_argument("--decay", default="cosine", choices=("cosine", "step"))
    g.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    g.add_argument(
        "--weight-decay", type=float, default=1e-4, help="on kernels only, not BatchNorm or biases"
    )
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("devices and allreduce")
    g.add_argument(
        "--allreduce",
        default="ddl",
        choices=sorted(training.ALLREDUCES),
        help="ddl: jax_ddl.pmean; lax: jax.lax.pmean",
    )
    g.add_argument(
        "--topology",
        default=None,
        help="jax_ddl grid, e.g. 4x2 (default: JAX_DDL_TOPOLOGY or automatic)",
    )
    g.add_argument(
        "--buckets",
        type=float,
        default=None,
        metavar="MB",
        help="reduce gradients in buckets of MB MiB inside the backward pass "
        "(jax_ddl.sync_gradients); 0: one call after it [with --allreduce ddl: "
        f"{BUCKETS_ACROSS_PROCESSES_MB:g} across processes, where the buckets' calls hide "
        "the links behind the backward pass; 0 in one process: docs/training.md]",
    )
    g.add_argument(
        "--measure-exposed",
        type=int,
        default=0,
        metavar="STEPS",
        help="after training, time STEPS train steps alternating with STEPS of the same "
        "step without any reduction (on copies of the final state, the last batch) and "
        "report the exposed communication per step: the difference of their medians",
    )
    g.add_argument(
        "--distributed",
        default="auto",
        choices=("auto", "on", "off"),
        help="join a multi-process run (one process per MPI rank, jax_ddl.distributed); "
        "auto: when started by mpiexec",
    )
    g.add_argument(
        "--host-devices", type=int, default=8, help="CPU devices when there is no accelerator"
    )

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/resnet", help="where metrics and plot go")
    g.add_argument("--metrics-out", default=None, help="JSON lines [OUT_DIR/metrics.jsonl]")
    g.add_argument("--plot-out", default=None, help="PNG [OUT_DIR/training.png]")
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations [one epoch]; 0: only at the end",
    )
    g.add_argument(
        "--log-every", type=int, default=10, help="steps between log lines when not on a terminal"
    )
    g.add_argument(
        "--metrics-every",
        type=int,
        default=10,
        help="steps between fetches of the metrics from the devices (each fetch waits for "
        "them; in between the host runs ahead, preparing the next batches)",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar [on a terminal]",
    )
    g.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints (off if unset)")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints [each evaluation]",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir",
    )
    g.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this step; the schedule still spans "
        "--steps/--epochs, so --resume later continues the same run",
    )
    return p


@dataclasses.dataclass
class Run:
    """Everything fixed before the first step."""

    args: argparse.Namespace
    mesh: object
    train_source: object
    eval_source: object
    model: object
    recipe: training.Recipe
    meta: dict
    eval_every: int
    checkpoint_every: int


def setup_devices(host_devices: int, distributed: str = "off") -> None:
    """Host CPU devices per process; joins a multi-process run when asked (or, with
    "auto", when started by mpiexec)."""
    if host_devices < 1:
        raise UsageError(f"--host-devices must be >= 1; got {host_devices}")
    if distributed == "on" or (distributed == "auto" and jax_ddl.distributed.launched_by_mpiexec()):
        jax_ddl.distributed.initialize(local_devices=host_devices)
        return
    try:
        jax.config.update("jax_num_cpu_devices", host_devices)
    except RuntimeError:
        pass  # backends already up (the program was imported, not run): keep theirs


def load_data(args):
    """(train source, eval source or None, image size) for the chosen data."""
    if args.data_dir is not None:
        size = args.image_size or 224
        _check_size(size)
        train_src = data.FolderSource(args.data_dir, "train", size, seed=args.seed)
        val_dir = pathlib.Path(args.data_dir) / "val"
        eval_src = (
            data.FolderSource(args.data_dir, "val", size, classes=train_src.classes)
            if val_dir.is_dir()
            else None
        )
        return train_src, eval_src
    if args.synthetic:
        size = args.image_size or 32
        _check_size(size)
        if args.num_classes < 2:
            raise UsageError(f"--num-classes must be >= 2; got {args.num_classes}")
        source = data.SyntheticSource(size, args.num_classes, seed=args.seed, size=args.batch_size)
        return source, None
    size = args.image_size or 8
    _check_size(size)
    return data.DigitsSource("train", size), data.DigitsSource("test", size)


def _check_size(size: int) -> None:
    if size < 4:
        raise UsageError(f"--image-size must be >= 4; got {size}")


def plan(args) -> Run:
    """Validates the arguments against the devices and data; builds the run."""
    devices = jax.devices()
    n_dev, n_proc = len(devices), jax.process_count()
    if args.batch_size < 1 or args.batch_size % n_dev:
        lo = max(n_dev, args.batch_size // n_dev * n_dev)
        raise UsageError(
            f"--batch-size {args.batch_size} does not divide over {n_dev} devices; use a "
            f"multiple of {n_dev} (e.g. {lo} or {lo + n_dev})"
        )
    platform = devices[0].platform
    handler = "cuda" if platform == "gpu" else platform  # jax's GPU devices: CUDA (or ROCm)
    if args.allreduce == "ddl" and handler not in jax_ddl.supported_platforms():
        raise UsageError(
            f"jax_ddl has no allreduce handler for {platform} devices yet (it has: "
            f"{', '.join(jax_ddl.supported_platforms())}); use --allreduce lax, or run on "
            f"host devices with JAX_PLATFORMS=cpu"
        )
    train_src, eval_src = load_data(args)
    if not args.synthetic and args.batch_size > len(train_src):
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the {len(train_src)} training "
            f"images; use at most {len(train_src) // n_dev * n_dev}"
        )
    per_epoch = max(1, data.steps_per_epoch(train_src, args.batch_size))
    if args.steps is not None:
        total = args.steps
    elif args.epochs is not None:
        total = int(math.ceil(args.epochs * per_epoch))
    else:
        total = 20 if args.synthetic else int((90 if args.data_dir else 5) * per_epoch)
    if total < 1:
        raise UsageError(f"--steps/--epochs must give at least one step; got {total}")
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(total // 10, 5 * per_epoch)
    if warmup < 0:
        raise UsageError(f"--warmup-steps must be >= 0; got {warmup}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError(f"--label-smoothing must be in [0, 1); got {args.label_smoothing}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive; got {args.lr}")
    if args.topology is not None and args.allreduce != "ddl":
        raise UsageError("--topology applies to --allreduce ddl only")
    if args.buckets is not None and args.buckets < 0:
        raise UsageError(f"--buckets must be >= 0 MiB; got {args.buckets:g}")
    if args.measure_exposed < 0:
        raise UsageError(f"--measure-exposed must be >= 0 steps; got {args.measure_exposed}")
    if args.buckets and args.allreduce != "ddl":
        raise UsageError("--buckets applies to --allreduce ddl only (jax_ddl.sync_gradients)")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (where the checkpoints are)")
    if args.metrics_every < 1:
        raise UsageError(f"--metrics-every must be >= 1; got {args.metrics_every}")
    for flag in ("eval_every", "checkpoint_every", "stop_at_step"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0; got {v}")

    image_shape = train_src.image_shape
    stem = args.stem if args.stem != "auto" else ("small" if image_shape[0] <= 64 else "imagenet")
    try:
        model = models.create_model(
            args.model,
            num_classes=train_src.num_classes,
            width=args.width,
            stem=stem,
            dtype=jax.numpy.dtype(args.dtype),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    recipe = training.Recipe(
        global_batch=args.batch_size,
        total_steps=total,
        lr_per_256=args.lr,
        warmup_steps=warmup,
        decay=args.decay,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
    )
    meta = {
        "model": args.model,
        "width": args.width,
        "stem": stem,
        "num_classes": train_src.num_classes,
        "image_shape": list(image_shape),
        "dataset": train_src.name,
        "global_batch": args.batch_size,
        "total_steps": total,
        "lr_per_256": args.lr,
        "warmup_steps": warmup,
        "decay": args.decay,
        "seed": args.seed,
    }
    eval_every = per_epoch if args.eval_every is None else args.eval_every
    if eval_src is None:
        eval_every = 0
    ckpt_every = args.checkpoint_every
    if ckpt_every is None:
        ckpt_every = eval_every or per_epoch
    del n_proc
    return Run(
        args,
        training.global_mesh(devices),
        train_src,
        eval_src,
        model,
        recipe,
        meta,
        eval_every,
        ckpt_every,
    )


def evaluate(run: Run, eval_step, state) -> dict:
    sums = {"loss": 0.0, "correct": 0, "count": 0}
    for images, labels, mask in data.eval_batches(
        run.eval_source,
        run.args.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers=run.args.workers,
    ):
        out = jax.device_get(
            eval_step(state, *training.shard_batch(run.mesh, images, labels, mask))
        )
        for k in sums:
            sums[k] += out[k].item()
    return {
        "accuracy": sums["correct"] / sums["count"],
        "loss": sums["loss"] / sums["count"],
        "count": sums["count"],
    }


def ddl_seconds(part: str = "all") -> float:
    """Seconds all local device threads have spent inside jax_ddl (summed): "all", or
    "wait" (waiting for every device to arrive: skew between devices' compute), or "work"
    (reducing and copying)."""
    c = jax_ddl.counters()
    wait = c["arrive_s"]
    work = c["reduce_scatter_s"] + c["broadcast_s"] + c["small_s"]
    return {"all": wait + work, "wait": wait, "work": work}[part]


def measure_exposed(run: Run, train_step, tx, state, batch, steps: int) -> dict:
    """Exposed communication per step, side by side: `steps` rounds, each one step of
    `train_step` and one of the same step without any reduction (the order alternating
    from round to round, so that neither always runs after the other), after one untimed
    round that compiles the second. Both start from copies of `state` and run on `batch`;
    `state` is left as it was. Every process runs the same rounds (the train step's
    collectives need all of them) and times its own steps."""
    bare = training.make_train_step(
        run.model,
        tx,
        run.mesh,
        allreduce=training.NO_REDUCTION,
        num_classes=run.train_source.num_classes,
        label_smoothing=run.recipe.label_smoothing,
    )
    copy = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))
    fns = {"step": train_step, "none": bare}
    states = {k: copy(state) for k in fns}
    times: dict = {k: [] for k in fns}
    for r in range(steps + 1):
        for k in ("step", "none") if r % 2 else ("none", "step"):
            t0 = time.perf_counter()
            states[k], m = fns[k](states[k], *batch)
            jax.block_until_ready(m)
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "exposed_s": med["step"] - med["none"],
        "exposed_step_s": med["step"],
        "exposed_baseline_s": med["none"],
        "exposed_steps": steps,
    }


def open_checkpoints(run: Run, state):
    """(Checkpoints or None, state, first step), resuming when asked."""
    args = run.args
    if not args.checkpoint_dir:
        return None, state, 0
    ckpts = Checkpoints(args.checkpoint_dir, run.meta)
    latest = ckpts.latest_step()
    if not args.resume:
        if latest is not None:
            raise CheckpointError(
                f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints (newest "
                f"step {latest}); pass --resume to continue that run, or choose an empty "
                f"folder"
            )
        return ckpts, state, 0
    if latest is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {args.checkpoint_dir}; drop --resume to start fresh"
        )
    warnings = ckpts.check_compatible(latest)
    for w in warnings:
        print(f"warning: resuming with a changed setting: {w}", file=sys.stderr)
    state = ckpts.restore(latest, like=state)
    return ckpts, state, int(jax.device_get(state.step))


def train(run: Run) -> dict:
    """The training loop; returns the summary record."""
    args, mesh, recipe = run.args, run.mesh, run.recipe
    n_dev = len(mesh.devices.flat)
    local_dev = jax.local_device_count()
    tx = recipe.optimizer()
    state = training.replicate(
        training.create_state(run.model, tx, run.train_source.image_shape, args.seed), mesh
    )
    ckpts, state, start = open_checkpoints(run, state)
    total = recipe.total_steps
    end = total if args.stop_at_step is None else min(total, args.stop_at_step)
    per_epoch = max(1, data.steps_per_epoch(run.train_source, args.batch_size))
    lr_at = recipe.schedule()
    train_step = training.make_train_step(
        run.model,
        tx,
        mesh,
        allreduce=args.allreduce,
        num_classes=run.train_source.num_classes,
        label_smoothing=recipe.label_smoothing,
        topology=args.topology,
        bucket_bytes=int(bucket_mb(args) * 2**20),
    )
    eval_step = (
        training.make_eval_step(run.model, mesh, num_classes=run.eval_source.num_classes)
        if run.eval_source is not None
        else None
    )

    out = pathlib.Path(args.out_dir)
    main_process = jax.process_index() == 0
    metrics = reporting.MetricsLog(
        args.metrics_out or out / "metrics.jsonl",
        resume_at=start if args.resume else None,
        enabled=main_process,
    )
    plot_path = args.plot_out or out / "training.png"
    progress = reporting.Progress(
        start, end, enabled=args.progress, log_every=args.log_every, silent=not main_process
    )
    progress.log(
        f"{args.model} ({training.param_count(state.params) / 1e6:.1f} M parameters, "
        f"{run.meta['stem']} stem) on {run.train_source.name} "
        f"{'x'.join(map(str, run.train_source.image_shape))}: {n_dev} {jax.devices()[0].platform} "
        f"devices in {jax.process_count()} process(es), global batch {args.batch_size}, "
        f"steps {start}->{end} of {total}, peak lr {recipe.peak_lr:.4g}, allreduce {args.allreduce}"
        + (f" in {bucket_mb(args):g} MiB buckets" if bucket_mb(args) > 0 else "")
    )
    if start >= end:
        progress.log(f"the state is at step {start}: nothing left to train")

    loader = data.TrainLoader(
        run.train_source,
        args.batch_size,
        seed=args.seed,
        start_step=start,
        total_steps=end,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers=args.workers,
    )
    timer = reporting.StepTimer()
    t_start = time.perf_counter()
    last_eval = None
    saved_at = None
    # Metrics stay on the devices until a fetch: every --metrics-every steps, at
    # evaluations, checkpoints and the end, and after the first step (its time includes
    # compilation). Between fetches the host runs ahead, dispatching the next steps, but
    # at most AHEAD steps: XLA's CPU runtime (jax 0.10) can deadlock when many
    # multi-device programs with collectives are queued at once (measured: jax.lax.psum
    # hung in 3 of 5 runs of 200 steps dispatched without waiting; none in 24 runs with
    # 10 or fewer in flight).
    AHEAD = 2
    pending: list = []
    ddl_mark = [ddl_seconds(), ddl_seconds("wait")]

    def fetch():
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        dt = timer.lap() / len(pending)
        ddl_s = wait_s = None
        if args.allreduce == "ddl":
            now = [ddl_seconds(), ddl_seconds("wait")]
            ddl_s = (now[0] - ddl_mark[0]) / local_dev / len(pending)
            wait_s = (now[1] - ddl_mark[1]) / local_dev / len(pending)
            ddl_mark[:] = now
        for (step, _), m in zip(pending, values):
            done = step + 1
            record = {
                "kind": "train",
                "step": done,
                "epoch": done / per_epoch,
                "loss": float(m["loss"]),
                "accuracy": float(m["accuracy"]),
                "lr": float(lr_at(step)),
                "images_per_s": args.batch_size / dt,
                "step_time_s": dt,
                "allreduce_s": ddl_s,
                "allreduce_wait_s": wait_s,
            }
            metrics.write(record)
            extra = f" held-out {last_eval:.3f}" if last_eval is not None else ""
            progress.step(done, record["loss"], record["lr"], record["images_per_s"], extra)
        pending.clear()

    def restart_clock():
        timer.reset()
        ddl_mark[:] = [ddl_seconds(), ddl_seconds("wait")]

    batch = None
    try:
        for step, (images, labels) in loader:
            batch = training.shard_batch(mesh, images, labels)
            state, m = train_step(state, *batch)
            pending.append((step, m))
            if len(pending) > AHEAD:  # wait (without fetching) for an older step
                jax.block_until_ready(pending[-AHEAD - 1][1])
            done = step + 1
            evaluate_now = run.eval_every and (done % run.eval_every == 0 or done == end)
            save_now = ckpts and (
                done == end or (run.checkpoint_every and done % run.checkpoint_every == 0)
            )
            if done == start + 1 or done % args.metrics_every == 0 or evaluate_now or save_now:
                fetch()
            if evaluate_now:
                ev = evaluate(run, eval_step, state)
                last_eval = ev["accuracy"]
                metrics.write({"kind": "eval", "step": done, **ev})
                progress.log(
                    f"step {done}: held-out accuracy {ev['accuracy']:.4f} "
                    f"(loss {ev['loss']:.4f}, {ev['count']} images)"
                )
                if main_process:
                    reporting.plot(metrics.records, plot_path)
                restart_clock()
            if save_now:
                ckpts.save(done, state)
                saved_at = done
                restart_clock()
        fetch()
    finally:
        loader.close()
        progress.close()
        if ckpts:
            ckpts.close()
    wall = time.perf_counter() - t_start
    if eval_step is not None and last_eval is None:
        ev = evaluate(run, eval_step, state)
        last_eval = ev["accuracy"]
        metrics.write({"kind": "eval", "step": int(jax.device_get(state.step)), **ev})
    exposed = {}
    if args.measure_exposed and batch is None:
        progress.log("--measure-exposed: no step was trained in this run, nothing measured")
    elif args.measure_exposed:
        progress.log(
            f"measuring exposed communication: {args.measure_exposed} steps with and "
            f"{args.measure_exposed} without the reduction, alternating"
        )
        exposed = measure_exposed(run, train_step, tx, state, batch, args.measure_exposed)
    new = [r for r in metrics.records if r.get("kind") == "train" and r["step"] > start]
    summary = {
        "kind": "summary",
        "model": args.model,
        "dataset": run.train_source.name,
        "image_size": run.train_source.image_shape[0],
        "allreduce": args.allreduce,
        "devices": n_dev,
        "processes": jax.process_count(),
        "buckets_mb": bucket_mb(args),
        "global_batch": args.batch_size,
        "first_step": start,
        "last_step": end,
        "wall_s": wall,
        "first_step_s": new[0]["step_time_s"] if new else None,
        "eval_accuracy": last_eval,
        "checkpoint_step": saved_at,
        **reporting.summarise(new, global_batch=args.batch_size),
        **exposed,
    }
    metrics.write(summary)
    metrics.close()
    if main_process:
        reporting.plot(metrics.records, plot_path)
        report(summary, metrics.path, plot_path)
    return summary


def report(summary: dict, metrics_path, plot_path) -> None:
    lines = [
        f"done: steps {summary['first_step']}->{summary['last_step']} in {summary['wall_s']:.1f} s"
    ]
    if "step_time_s" in summary:
        share = summary.get("allreduce_share")
        lines.append(
            f"  step time {summary['step_time_s'] * 1e3:.1f} ms (median of "
            f"{summary['steps_timed']}, first step {summary['first_step_s']:.1f} s with "
            f"compilation), {summary['images_per_s']:,.1f} images/s"
        )
        if share is not None and summary.get("buckets_mb"):
            # Bucket calls run inside the backward pass and overlap each other: their
            # summed time is not a share of the step (--measure-exposed measures what shows).
            lines.append(
                f"  in jax_ddl: {summary['allreduce_s'] * 1e3:.1f} ms a step, summed over "
                f"{summary['buckets_mb']:g} MiB buckets' calls that overlap the backward pass "
                "and each other"
                + ("" if "exposed_s" in summary else " (what shows: --measure-exposed STEPS)")
            )
        elif share is not None:
            lines.append(
                f"  in jax_ddl: {summary['allreduce_s'] * 1e3:.1f} ms a step "
                f"({share:.1%} of the step; {summary['allreduce_wait_s'] * 1e3:.1f} ms of it "
                f"waiting for the slowest device)"
            )
    if "exposed_s" in summary:
        lines.append(
            f"  exposed communication: {summary['exposed_s'] * 1e3:.1f} ms a step (median "
            f"step {summary['exposed_step_s'] * 1e3:.1f} ms against "
            f"{summary['exposed_baseline_s'] * 1e3:.1f} ms for the same step without any "
            f"reduction; {summary['exposed_steps']} steps each, alternating, after training, "
            "on one batch already on the devices)"
        )
    if summary.get("eval_accuracy") is not None:
        lines.append(f"  held-out accuracy {summary['eval_accuracy']:.4f}")
    lines.append(f"  metrics: {metrics_path}\n  plot: {plot_path}")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_devices(args.host_devices, args.distributed)
        run = plan(args)
        train(run)
    except USER_ERRORS as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:  # a setting jax_ddl does not support (yet), named
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
