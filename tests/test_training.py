"""The training program in examples/ (the main job): its pieces against independent
oracles, and the command line end to end on every data path.

End-to-end runs use a tiny ResNet-18 (width 4, 8x8 images) so each takes seconds; they run
the real program in a subprocess with its own 8 host devices, as a user would.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import jax_ddl  # noqa: E402
from jax_ddl._src.buckets import DEFAULT_FIRST_BUCKET_BYTES, plan_buckets  # noqa: E402
from resnet import input_pipeline as data  # noqa: E402
from resnet import models  # noqa: E402
from resnet import train as training  # noqa: E402
from resnet.main import main, measure_exposed  # noqa: E402

TINY = ["--model", "resnet18", "--width", "4"]


def run_cli(*args, timeout=300):
    """Runs examples/train.py in a fresh process (float32 defaults, 8 host devices)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def param_count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize(
    "name, published",
    # Parameter counts of the reference ImageNet models (torchvision's, 1000 classes).
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_imagenet_models_have_the_published_parameter_counts(name, published):
    model = models.create_model(name, num_classes=1000, stem="imagenet")
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    assert param_count(shapes["params"]) == published


def test_small_stem_keeps_resolution_and_imagenet_stem_divides_by_four():
    small = models.create_model("resnet18", num_classes=10, width=4, stem="small")
    big = models.create_model("resnet18", num_classes=10, width=4, stem="imagenet")
    s = jax.eval_shape(lambda: small.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    b = jax.eval_shape(lambda: big.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert s["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 4)
    assert b["params"]["stem_conv"]["kernel"].shape == (7, 7, 3, 4)


def test_last_batchnorm_of_every_block_starts_at_zero_so_blocks_start_as_identity():
    model = models.create_model("resnet50", num_classes=10, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    blocks = [k for k in params if k.startswith("BottleneckBlock_")]
    assert len(blocks) == 16
    for k in blocks:
        assert not np.any(params[k]["BatchNorm_2"]["scale"]), k
        assert np.all(params[k]["BatchNorm_0"]["scale"] == 1), k


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="--model must be one of .*resnet50.*got 'resnet51'"):
        models.create_model("resnet51", num_classes=10)


# ---------------------------------------------------------------------------------------
# The recipe


def test_learning_rate_scales_with_batch_warms_up_and_decays():
    r = training.Recipe(global_batch=512, total_steps=100, warmup_steps=10)
    lr = r.schedule()
    assert r.peak_lr == pytest.approx(0.2)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.1)
    assert float(lr(10)) == pytest.approx(0.2)
    assert float(lr(55)) == pytest.approx(0.1, rel=1e-5)  # cosine half-way
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-8)
    step = training.Recipe(global_batch=256, total_steps=100, decay="step").schedule()
    assert [float(step(s)) for s in (0, 34, 67, 99)] == pytest.approx([0.1, 0.01, 1e-3, 1e-4])


@pytest.mark.parametrize("warmup", [0, 3])
def test_step_decay_never_collides_and_never_starts_decayed(warmup):
    """x0.1 at 1/3, 2/3 and 8/9 of the steps after warm-up, for every run length: the
    first step after warm-up is at the peak rate, decays that round to one step multiply
    there (a 2-step run used to decay at steps 0 and 1, one decay lost)."""
    for total in range(warmup + 1, warmup + 40):
        rest = total - warmup
        lr = training.Recipe(
            global_batch=256, total_steps=total, warmup_steps=warmup, decay="step"
        ).schedule()
        bounds = [max(1, round(rest * f)) for f in (1 / 3, 2 / 3, 8 / 9)]
        for t in range(rest + 1):
            want = 0.1 * 0.1 ** sum(t >= b for b in bounds)
            assert float(lr(warmup + t)) == pytest.approx(want, rel=1e-6), (total, t)
    # 2 steps: 1/3 and 2/3 both round to step 1 (x0.01 there), 8/9 to step 2.
    assert training.step_decay_boundaries(2) == {1: pytest.approx(0.01), 2: pytest.approx(0.1)}


def test_weight_decay_reaches_kernels_only_and_sgd_is_nesterov():
    r = training.Recipe(global_batch=256, total_steps=10, weight_decay=0.5)
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
        "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "dense": {"bias": jnp.ones(2)},
    }
    tx = r.optimizer()
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Nesterov on g = wd * p: update = -lr * (g + momentum * g) = -0.1 * 0.5 * 1.9.
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * 1.9, rtol=1e-6)
    for leaf in (updates["bn"]["scale"], updates["bn"]["bias"], updates["dense"]["bias"]):
        assert not np.any(leaf)


def test_label_smoothing_matches_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    logp = jax.nn.log_softmax(logits)[0]
    want = -(0.9 + 0.1 / 3) * logp[1] - (0.1 / 3) * (logp[0] + logp[2])
    got = training.cross_entropy(logits, jnp.array([1]), 3, 0.1)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------------------------
# The train step: jax_ddl against jax.lax


def _setup(allreduce, steps, seed=0, topology=None, bucket_bytes=0, model="resnet18"):
    mesh = training.global_mesh()
    src = data.DigitsSource("train", 8)
    model = models.create_model(model, num_classes=10, width=4)
    recipe = training.Recipe(global_batch=64, total_steps=steps, warmup_steps=2)
    tx = recipe.optimizer()
    state = training.replicate(training.create_state(model, tx, (8, 8, 1), seed), mesh)
    step = training.make_train_step(
        model,
        tx,
        mesh,
        allreduce=allreduce,
        num_classes=10,
        topology=topology,
        bucket_bytes=bucket_bytes,
    )
    return mesh, src, state, step


def _train(allreduce, steps, topology=None, bucket_bytes=0, model="resnet18"):
    mesh, src, state, step = _setup(
        allreduce, steps, topology=topology, bucket_bytes=bucket_bytes, model=model
    )
    losses = []
    for s in range(steps):
        idx = data.train_indices(len(src), 64, 0, s)
        state, m = step(state, *training.shard_batch(mesh, *src.load(idx, s, True)))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state)


STEPS = 6


@pytest.fixture(scope="module")
def lax_run():
    return _train("lax", STEPS)


@pytest.mark.parametrize("topology", [None, "2x2x2"])
def test_ddl_and_lax_train_to_the_same_losses_and_parameters(lax_run, topology):
    ddl_losses, ddl_state = _train("ddl", STEPS, topology)
    lax_losses, lax_state = lax_run
    # Float tolerance: the two may add the 8 gradients in different orders (jax_ddl in
    # its plan's fixed order, XLA in its own), which changes float32 rounding. Measured
    # after 6 steps: the flat plan matched XLA bitwise here; "2x2x2" (another order)
    # differed by 3e-7 relative in the loss and 6e-7 absolute in the parameters. The
    # bounds below leave a 30x margin; a wrong mean (a sum, or one device's gradient
    # lost) moves the loss by more than 1e-2.
    np.testing.assert_allclose(ddl_losses, lax_losses, rtol=1e-5)
    assert ddl_losses[-1] < ddl_losses[0]
    flat_d = jax.tree_util.tree_leaves_with_path(ddl_state.params)
    flat_l = jax.tree_util.tree_leaves(lax_state.params)
    for (path, d), lx in zip(flat_d, flat_l):
        np.testing.assert_allclose(d, lx, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    for d, lx in zip(
        jax.tree_util.tree_leaves(ddl_state.batch_stats),
        jax.tree_util.tree_leaves(lax_state.batch_stats),
    ):
        np.testing.assert_allclose(d, lx, rtol=1e-4, atol=2e-5)
    assert int(ddl_state.step) == STEPS


@pytest.mark.parametrize("topology", ["2x2x2"])  # measured: the flat plan is equal too
def test_gradient_buckets_train_exactly_as_one_call_after_the_backward_pass(topology):
    """ResNet-18 for 3 steps with gradients reduced in 16 KiB buckets inside the backward
    pass, against one jax_ddl call after it: the same losses and parameters, bit for bit
    (every element is reduced in the plan's order whichever call carries it)."""
    one_losses, one_state = _train("ddl", 3, topology)
    mesh, src, state, step = _setup("ddl", 3, topology=topology, bucket_bytes=16 << 10)
    batch = training.shard_batch(mesh, *src.load(np.arange(64), 0, True))
    # One call per bucket (all float32), and one for BatchNorm statistics and metrics.
    buckets = plan_buckets(state.params, 16 << 10, DEFAULT_FIRST_BUCKET_BYTES)
    assert len(buckets) > 4
    assert step.lower(state, *batch).as_text().count("custom_call @jax_ddl_allreduce") == (
        len(buckets) + 1
    )
    b_losses, b_state = _train("ddl", 3, topology, bucket_bytes=16 << 10)
    assert b_losses == one_losses
    for (path, b), o in zip(
        jax.tree_util.tree_leaves_with_path(b_state.params),
        jax.tree_util.tree_leaves(one_state.params),
    ):
        np.testing.assert_array_equal(b, o, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="buckets need allreduce='ddl'"):
        _setup("lax", 1, bucket_bytes=1 << 20)


def test_resnet50_with_buckets_trains_as_one_call_bitwise_and_as_lax_within_tolerance():
    """ResNet-50 (width 4) for 3 steps, flat plan, 64 KiB buckets: bit for bit the losses
    and parameters of one jax_ddl call after the backward pass, and those of jax.lax.pmean
    within the float tolerance of test_ddl_and_lax_train_to_the_same_losses_and_parameters."""
    b_losses, b_state = _train("ddl", 3, bucket_bytes=64 << 10, model="resnet50")
    one_losses, one_state = _train("ddl", 3, model="resnet50")
    lax_losses, lax_state = _train("lax", 3, model="resnet50")
    assert b_losses == one_losses
    np.testing.assert_allclose(b_losses, lax_losses, rtol=1e-5)
    for b, o, lx in zip(
        jax.tree_util.tree_leaves(b_state.params),
        jax.tree_util.tree_leaves(one_state.params),
        jax.tree_util.tree_leaves(lax_state.params),
    ):
        np.testing.assert_array_equal(b, o)
        np.testing.assert_allclose(b, lx, rtol=1e-4, atol=2e-5)


def test_train_step_reduces_through_one_jax_ddl_call_and_lax_mode_through_none():
    mesh, src, state, step = _setup("ddl", 2)
    batch = training.shard_batch(mesh, *src.load(np.arange(64), 0, True))
    ddl_text = step.lower(state, *batch).as_text()
    assert ddl_text.count("custom_call @jax_ddl_allreduce") == 1
    _, _, state, lax_step = _setup("lax", 2)
    lax_text = lax_step.lower(state, *batch).as_text()
    assert "jax_ddl_allreduce" not in lax_text and "all_reduce" in lax_text


def test_exposed_communication_alternates_the_step_with_the_unreduced_one_on_copies():
    """measure_exposed (train.py --measure-exposed) times the real train step (its jax_ddl
    calls made, once per round) against the same step without reduction (none made), on
    copies: the state it is given is still readable and unchanged afterwards, though the
    train step donates its state."""
    mesh = training.global_mesh()
    src = data.DigitsSource("train", 8)
    model = models.create_model("resnet18", num_classes=10, width=4)
    recipe = training.Recipe(global_batch=64, total_steps=4, label_smoothing=0.1)
    tx = recipe.optimizer()
    state = training.replicate(training.create_state(model, tx, (8, 8, 1), 0), mesh)
    step = training.make_train_step(
        model, tx, mesh, allreduce="ddl", num_classes=10, label_smoothing=0.1, bucket_bytes=64 << 10
    )
    batch = training.shard_batch(mesh, *src.load(np.arange(64), 0, True))
    before = jax.device_get(state)
    copy = jax.tree_util.tree_map(jnp.copy, state)
    calls = jax_ddl.counters()["calls"]
    jax.block_until_ready(step(copy, *batch))
    per_step = jax_ddl.counters()["calls"] - calls
    assert per_step > 1  # the buckets' calls and the statistics'
    run = types.SimpleNamespace(model=model, mesh=mesh, train_source=src, recipe=recipe)
    calls = jax_ddl.counters()["calls"]
    out = measure_exposed(run, step, tx, state, batch, 3)
    # 3 timed rounds and the untimed first one: 4 real steps, the unreduced ones no call.
    assert jax_ddl.counters()["calls"] - calls == 4 * per_step
    assert out["exposed_steps"] == 3
    assert out["exposed_step_s"] > 0 and out["exposed_baseline_s"] > 0
    assert out["exposed_s"] == out["exposed_step_s"] - out["exposed_baseline_s"]
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_batchnorm_statistics_are_averaged_over_devices():
    """One step from a fresh state: the running mean of the stem's BatchNorm is
    0.1 x (the mean over devices of each device's batch mean), computed here by numpy."""
    mesh, src, state, step = _setup("ddl", 2)
    idx = data.train_indices(len(src), 64, 0, 0)
    images, labels = src.load(idx, 0, True)
    kernel = np.asarray(state.params["stem_conv"]["kernel"])
    new_state, _ = step(state, *training.shard_batch(mesh, images, labels))
    conv = jax.lax.conv_general_dilated(
        jnp.asarray(images),
        jnp.asarray(kernel),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    per_device = np.asarray(conv).reshape(8, 8, *conv.shape[1:]).mean(axis=(1, 2, 3))
    want = 0.1 * per_device.mean(axis=0)
    got = np.asarray(new_state.batch_stats["stem_bn"]["mean"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_unknown_allreduce_is_refused():
    mesh = training.global_mesh()
    model = models.create_model("resnet18", num_classes=10, width=4)
    with pytest.raises(ValueError, match="--allreduce must be one of .*got 'nccl'"):
        training.make_train_step(model, optax.sgd(0.1), mesh, allreduce="nccl", num_classes=10)


# ---------------------------------------------------------------------------------------
# Data


def test_digits_split_is_the_whole_set_and_standardised():
    tr, te = data.DigitsSource("train", 8), data.DigitsSource("test", 8)
    assert (len(tr), len(te)) == (1437, 360)
    assert tr.images.shape == (1437, 8, 8, 1) and tr.num_classes == 10
    assert abs(tr.images.mean()) < 1e-5 and abs(tr.images.std() - 1) < 1e-4
    # Stratified: each class's share of the held-out split is its share of the whole set.
    whole = np.bincount(np.concatenate([tr.labels, te.labels]))
    assert np.all(np.abs(np.bincount(te.labels) - whole * 0.2) <= 1)
    assert data.DigitsSource("train", 16).images.shape == (1437, 16, 16, 1)


def test_train_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    n, b = 100, 16
    per_epoch = n // b
    epoch0 = np.concatenate([data.train_indices(n, b, 3, s) for s in range(per_epoch)])
    assert len(set(epoch0)) == per_epoch * b
    np.testing.assert_array_equal(data.train_indices(n, b, 3, 2), data.train_indices(n, b, 3, 2))
    assert not np.array_equal(
        data.train_indices(n, b, 3, per_epoch), data.train_indices(n, b, 3, 0)
    )
    rows = [data.process_rows(16, p, 4) for p in range(4)]
    assert np.array_equal(np.concatenate([np.arange(16)[r] for r in rows]), np.arange(16))


def test_loader_resumes_with_the_batches_of_an_uninterrupted_run():
    src = data.DigitsSource("train", 8)
    full = data.TrainLoader(src, 64, seed=1, start_step=0, total_steps=30)
    resumed = data.TrainLoader(src, 64, seed=1, start_step=25, total_steps=30)
    try:
        a = [lbl for _, (_, lbl) in full][25:]
        b = [lbl for _, (_, lbl) in resumed]
    finally:
        full.close()
        resumed.close()
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def make_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=(20, 14)):
    """An ImageNet-layout folder of small random PNG/JPEG images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            d = pathlib.Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                suffix = ".JPEG" if i % 2 else ".png"
                Image.fromarray(pixels).save(d / f"{c}_{i}{suffix}")
    return pathlib.Path(root)


def test_folder_source_decodes_crops_and_normalises(tmp_path):
    root = make_folder(tmp_path)
    tr = data.FolderSource(root, "train", 12, seed=0)
    va = data.FolderSource(root, "val", 12, classes=tr.classes)
    assert (len(tr), len(va), tr.classes) == (18, 6, ["cat", "dog", "fox"])
    x, y = tr.load(np.arange(6), step=0, train=True)
    assert x.shape == (6, 12, 12, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [0] * 6)
    x2, _ = tr.load(np.arange(6), step=0, train=True)
    x3, _ = tr.load(np.arange(6), step=1, train=True)
    np.testing.assert_array_equal(x, x2)  # augmentation is a function of (seed, step, example)
    assert not np.array_equal(x, x3)
    # Evaluation: a resize-and-centre-crop of the decoded image, normalised.
    from PIL import Image

    v, _ = va.load([0], step=0, train=False)
    # 20x14 image, side 12: the short side is already round(12 / 0.875) = 14, so no
    # resize; the centre 12x12 starts at (4, 1).
    im = Image.open(va.paths[0]).convert("RGB")
    assert im.size == (20, 14)
    crop = np.asarray(im.crop((4, 1, 16, 13)), np.float32) / 255.0
    np.testing.assert_allclose(v[0], (crop - data.IMAGENET_MEAN) / data.IMAGENET_STD, atol=1e-5)


def test_augmentation_is_the_same_with_any_number_of_processes(tmp_path):
    """Each process builds its own rows of the global batch: the crops and flips come from
    the example, not from its row in a process's share, so 1, 2 or 3 processes assemble the
    very batch one process builds (the old seeding gave every process's rows the same
    augmentations)."""
    root = make_folder(tmp_path, per_class=8)
    src = data.FolderSource(root, "train", 12, seed=5)
    loaders = {
        procs: [
            data.TrainLoader(
                src, 6, seed=1, start_step=3, total_steps=4, process_index=p, process_count=procs
            )
            for p in range(procs)
        ]
        for procs in (1, 2, 3)
    }
    whole = loaders[1][0].batch(3)[0]
    for procs in (2, 3):
        parts = np.concatenate([loader.batch(3)[0] for loader in loaders[procs]])
        np.testing.assert_array_equal(parts, whole)
    for group in loaders.values():
        for loader in group:
            loader.close()


def test_synthetic_batches_larger_than_the_image_pool():
    """--synthetic --batch-size 1024 divided by zero (an epoch of 512 pool images held no
    batch); the source now counts at least one batch of examples."""
    src = data.SyntheticSource(8, 10, size=1024)
    assert len(src) == 1024 and data.steps_per_epoch(src, 1024) == 1
    loader = data.TrainLoader(src, 1024, seed=0, start_step=0, total_steps=3)
    try:
        steps = [(step, x.shape, y.shape) for step, (x, y) in loader]
    finally:
        loader.close()
    assert steps == [(s, (1024, 8, 8, 3), (1024,)) for s in range(3)]


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="is not a folder"):
        data.FolderSource(tmp_path / "nope", "train", 8)
    with pytest.raises(data.DataError, match="has no train/ folder"):
        data.FolderSource(tmp_path, "train", 8)
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DataError, match="has no class folders"):
        data.FolderSource(tmp_path, "train", 8)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(data.DataError, match="holds no images"):
        data.FolderSource(tmp_path, "train", 8)


# ---------------------------------------------------------------------------------------
# Command-line errors (in this process: they stop before any training)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--batch-size", "60"],
            "--batch-size 60 does not divide over 8 devices; use a multiple "
            "of 8 \\(e.g. 56 or 64\\)",
        ),
        (["--batch-size", "2048"], "larger than the 1437 training images"),
        (["--data-dir", "/nonexistent/imagenet"], "'/nonexistent/imagenet' is not a folder"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--allreduce", "lax", "--topology", "4x2"], "--topology applies to --allreduce ddl"),
        (["--allreduce", "lax", "--buckets", "4"], "--buckets applies to --allreduce ddl"),
        (["--buckets", "-1"], "--buckets must be >= 0 MiB"),
        (["--measure-exposed", "-2"], "--measure-exposed must be >= 0 steps"),
        (["--image-size", "2"], "--image-size must be >= 4"),
    ],
)
def test_bad_command_lines_exit_2_naming_the_flag(argv, message, capsys):
    assert main([*TINY, "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "train.py: error:" in err
    assert re.search(message, err), err


def test_empty_data_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert main([*TINY, "--data-dir", str(tmp_path)]) == 2
    assert "has no class folders" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# End to end, in a fresh process


def test_default_data_trains_and_writes_metrics_and_plot(tmp_path):
    r = run_cli(*TINY, "--steps", "3", "--eval-every", "2", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [x for x in records if x["kind"] == "train"]
    evals = [x for x in records if x["kind"] == "eval"]
    (summary,) = [x for x in records if x["kind"] == "summary"]
    assert [x["step"] for x in train] == [1, 2, 3]
    for x in train:
        assert {"loss", "lr", "images_per_s", "step_time_s", "allreduce_s"} <= set(x)
        assert x["allreduce_s"] > 0 and math.isfinite(x["loss"])
    assert [x["step"] for x in evals] == [2, 3] and evals[-1]["count"] == 360
    assert 0 <= evals[-1]["accuracy"] <= 1
    assert summary["devices"] == 8 and summary["allreduce"] == "ddl"
    assert 0 < summary["allreduce_share"] < 1 and summary["images_per_s"] > 0
    png = (tmp_path / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "in jax_ddl:" in r.stdout and "held-out accuracy" in r.stdout


def folder_run(root, out, batch):
    """Two steps of the tiny model on folder data at 16x16."""
    return [
        *TINY,
        "--data-dir",
        str(root),
        "--image-size",
        "16",
        "--batch-size",
        str(batch),
        "--steps",
        "2",
        "--out-dir",
        str(out),
    ]


def test_folder_data_trains(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    r = run_cli(*folder_run(root, tmp_path / "out", batch=8), "--workers", "2")
    assert r.returncode == 0, r.stderr
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [x["step"] for x in records if x["kind"] == "train"] == [1, 2]
    (ev,) = [x for x in records if x["kind"] == "eval"]
    assert ev["count"] == 6


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    r = run_cli(*folder_run(root, tmp_path / "out", batch=24))
    assert r.returncode == 2
    assert f"cannot read image {bad}" in r.stderr


def test_synthetic_data_trains_at_any_size(tmp_path):
    r = run_cli(
        *TINY,
        "--synthetic",
        "--image-size",
        "20",
        "--num-classes",
        "7",
        "--steps",
        "2",
        "--out-dir",
        str(tmp_path),
        "--allreduce",
        "lax",
        "--measure-exposed",
        "2",
    )
    assert r.returncode == 0, r.stderr
    records = read_metrics(tmp_path / "metrics.jsonl")
    (summary,) = [x for x in records if x["kind"] == "summary"]
    assert summary["image_size"] == 20 and summary["allreduce"] == "lax"
    # --measure-exposed: the step with jax.lax.pmean against the step without reduction.
    assert summary["exposed_steps"] == 2 and summary["exposed_baseline_s"] > 0
    assert summary["exposed_s"] == summary["exposed_step_s"] - summary["exposed_baseline_s"]
    assert f"exposed communication: {summary['exposed_s'] * 1e3:.1f} ms a step" in r.stdout
    assert "allreduce_share" not in summary  # jax_ddl is not used in lax mode
    assert all(x["allreduce_s"] is None for x in records if x["kind"] == "train")


def test_synthetic_batch_of_1024_trains(tmp_path):
    r = run_cli(
        *TINY,
        "--synthetic",
        "--image-size",
        "8",
        "--batch-size",
        "1024",
        "--steps",
        "1",
        "--out-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert [
        x["step"] for x in read_metrics(tmp_path / "metrics.jsonl") if x["kind"] == "train"
    ] == [1]


def test_metrics_are_fetched_in_windows_one_record_per_step(tmp_path):
    """--metrics-every 4: the host fetches the metrics every 4 steps (and after the first
    step, at evaluations and at the end), still writing one record per step; a window's
    steps share its time."""
    r = run_cli(
        *TINY,
        "--steps",
        "10",
        "--eval-every",
        "6",
        "--metrics-every",
        "4",
        "--out-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    train = [x for x in read_metrics(tmp_path / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 11))
    times = [x["step_time_s"] for x in train]
    # Windows: {1}, {2,3,4}, {5,6} (evaluation), {7,8}, {9,10} (end).
    for window in ([1, 2, 3], [4, 5], [6, 7], [8, 9]):
        assert len({times[i] for i in window}) == 1, times
    assert run_cli(*TINY, "--metrics-every", "0").returncode == 2


def test_a_killed_run_resumes_with_each_step_logged_once(tmp_path):
    """A run killed (SIGKILL) after its checkpoint at step 4, with later steps in its
    metrics file and a torn last line: --resume continues from its last checkpoint, the
    file ends with every step exactly once, and the summary counts the resumed steps
    only (the file used to hold the steps past the checkpoint twice, and a torn line
    raised JSONDecodeError)."""
    import signal
    import time

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = [
        *TINY,
        "--steps",
        "12",
        "--checkpoint-every",
        "4",
        "--metrics-every",
        "1",
        "--out-dir",
        str(out),
        "--checkpoint-dir",
        str(ckpt),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--no-progress", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    metrics_file = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            steps = []
            if metrics_file.exists():
                steps = [x["step"] for x in data_records(metrics_file) if x["kind"] == "train"]
            # Past step 6, with the checkpoint of step 4 complete (orbax renames its folder
            # into place when it is).
            if max(steps, default=0) >= 6 and (ckpt / "4").is_dir():
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with open(metrics_file, "a") as f:
        f.write('{"kind": "train", "step": 9, "lo')  # a line the crash cut short
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(metrics_file)  # every line parses
    train = [x["step"] for x in records if x["kind"] == "train"]
    assert train == list(range(1, 13))
    (summary,) = [x for x in records if x["kind"] == "summary"]
    # Step 4's checkpoint, or step 8's if it completed before the kill.
    assert summary["first_step"] in (4, 8)
    assert summary["steps_timed"] == 12 - summary["first_step"] - 1


def data_records(path):
    from resnet import reporting

    return reporting.read_records(path)


def _restore(directory, step):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree_util.tree_leaves_with_path(out["state"])


def test_stopped_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    common = [*TINY, "--steps", "8", "--eval-every", "4"]
    full = run_cli(
        *common, "--out-dir", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "a" / "ckpt")
    )
    assert full.returncode == 0, full.stderr
    ckpt_b = str(tmp_path / "b" / "ckpt")
    first = run_cli(
        *common, "--out-dir", str(tmp_path / "b"), "--checkpoint-dir", ckpt_b, "--stop-at-step", "3"
    )
    assert first.returncode == 0, first.stderr
    again = run_cli(*common, "--out-dir", str(tmp_path / "b"), "--checkpoint-dir", ckpt_b)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    second = run_cli(
        *common, "--out-dir", str(tmp_path / "b"), "--checkpoint-dir", ckpt_b, "--resume"
    )
    assert second.returncode == 0, second.stderr
    # At the end already: nothing trained, so nothing to measure (said, not an error).
    done = run_cli(
        *common,
        "--out-dir",
        str(tmp_path / "b"),
        "--checkpoint-dir",
        ckpt_b,
        "--resume",
        "--measure-exposed",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "nothing left to train" in done.stderr
    assert "--measure-exposed: no step was trained in this run, nothing measured" in done.stderr
    # Same batches, same reduction order, deterministic kernels: bitwise equal.
    a, b = _restore(tmp_path / "a" / "ckpt", 8), _restore(ckpt_b, 8)
    assert len(a) == len(b) > 50
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )
    ra, rb = (
        read_metrics(tmp_path / "a" / "metrics.jsonl"),
        read_metrics(tmp_path / "b" / "metrics.jsonl"),
    )
    loss = lambda rs: [(x["step"], x["loss"]) for x in rs if x["kind"] == "train"]
    assert loss(ra) == loss(rb)  # the resumed log continues the first part's
    # A checkpoint from another model is refused, naming what differs.
    other = run_cli(
        "--model",
        "resnet18",
        "--width",
        "8",
        "--steps",
        "8",
        "--out-dir",
        str(tmp_path / "c"),
        "--checkpoint-dir",
        ckpt_b,
        "--resume",
    )
    assert other.returncode == 2
    assert "written by another model (width=4); this run has width=8" in other.stderr


def test_a_pending_bucket_call_does_not_hold_up_the_backward_pass():
    """Rank 7's first gradient-bucket call arrives 1.5 s late (test fault); meanwhile the
    backward pass runs on, so device 0 reaches later buckets' calls before that call
    completes. Before the buckets' sums went through one gate (jax_ddl._src.gate), the
    optimizer read each sum right after its call and XLA gave its memory to the next
    backward-pass instruction, which then waited for the pending call: every device reached
    the next call only after the late one completed."""
    from jax_ddl import _ddl

    mesh = training.global_mesh()
    src = data.SyntheticSource(16, 10, pool=16)
    model = models.create_model("resnet18", num_classes=10, width=16, stem="small")
    tx = training.Recipe(global_batch=16, total_steps=10, warmup_steps=1).optimizer()
    host = jax.device_get(training.create_state(model, tx, src.image_shape, 0))
    batch = training.shard_batch(mesh, *src.load(np.arange(16), 0, True))
    step = training.make_train_step(
        model, tx, mesh, allreduce="ddl", num_classes=10, bucket_bytes=256 * 1024
    )
    state = training.replicate(host, mesh)
    state, _ = step(state, *batch)
    jax.block_until_ready(state)
    _ddl.set_fault("delay", 7, 1500, 1)
    with jax_ddl.trace() as t:
        state, metrics = step(state, *batch)
        jax.block_until_ready((state, metrics))
    assert np.isfinite(float(metrics["loss"]))
    by_site = {}
    for e in t.events:
        by_site.setdefault(e.site, []).append(e)
    assert len(by_site) >= 4, sorted(by_site)
    late = next(evs for evs in by_site.values() if any(e.rank == 7 and e.wait > 1.0 for e in evs))
    late_end = max(e.end for e in late)
    first = min(e.start for e in late)
    reached = [
        site
        for site, evs in by_site.items()
        if evs is not late
        and min(e.start for e in evs if e.device == 0) < late_end - 0.5
        and min(e.start for e in evs) > first
    ]
    assert len(reached) >= 2, {
        s: [round(e.start - first, 3) for e in v] for s, v in by_site.items()
    }
