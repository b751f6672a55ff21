"""The pure pieces of data-parallel training: state, optimiser, train and eval steps.

Every device holds the whole model and a slice of the global batch (`shard_map` over one
mesh axis spanning all devices of all processes). The gradients, the BatchNorm running
statistics and the step's loss and accuracy are averaged by one allreduce: `jax_ddl.pmean`,
or `jax.lax.pmean` with `allreduce="lax"`. That line is the only place the two differ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ddl

AXIS = "data"
ALLREDUCES = {"ddl": jax_ddl.pmean, "lax": jax.lax.pmean}
# For benchmarks only: the same step with no reduction at all (each device keeps its own
# gradients; the state that leaves is device 0's), the baseline of "exposed communication".
NO_REDUCTION = "none"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Goyal et al.'s large-batch SGD recipe, as DDL trained ResNet-50.

    Attributes:
      global_batch: images per step over all devices.
      total_steps: length of the schedule.
      lr_per_256: learning rate for a global batch of 256; scaled linearly with the batch.
      warmup_steps: linear warm-up from 0 to the scaled rate.
      decay: "cosine" to 0 at `total_steps`, or "step" (x0.1 at 1/3, 2/3 and 8/9 of the
        steps after warm-up: the 30/60/80-of-90-epoch schedule; each boundary is at least
        one step in, and boundaries that round to the same step decay together).
      momentum: Nesterov momentum.
      weight_decay: L2 on convolution and dense kernels only (not BatchNorm, not biases).
      label_smoothing: 0 for plain cross-entropy.
    """

    global_batch: int
    total_steps: int
    lr_per_256: float = 0.1
    warmup_steps: int = 0
    decay: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0

    @property
    def peak_lr(self) -> float:
        return self.lr_per_256 * self.global_batch / 256

    def schedule(self) -> Callable:
        peak = self.peak_lr
        warmup = max(0, min(self.warmup_steps, self.total_steps))
        rest = max(1, self.total_steps - warmup)
        if self.decay == "cosine":
            after = optax.cosine_decay_schedule(peak, rest)
        elif self.decay == "step":
            after = optax.piecewise_constant_schedule(peak, step_decay_boundaries(rest))
        else:
            raise ValueError(f"decay must be 'cosine' or 'step'; got {self.decay!r}")
        if warmup == 0:
            return after
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup]
        )

    def optimizer(self) -> optax.GradientTransformation:
        decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
        return optax.chain(
            optax.add_decayed_weights(self.weight_decay, mask=decay_mask),
            optax.sgd(self.schedule(), momentum=self.momentum, nesterov=True),
        )


STEP_DECAY_AT = (1 / 3, 2 / 3, 8 / 9)


def step_decay_boundaries(steps: int) -> dict:
    """{step: factor} for x0.1 at 1/3, 2/3 and 8/9 of `steps`. A boundary is never step 0
    (the run starts at the peak rate), and boundaries that round to one step multiply
    there, so a short run still decays by 1e-3 in all (or keeps the peak if too short
    for any boundary)."""
    bounds: dict = {}
    for f in STEP_DECAY_AT:
        b = max(1, round(steps * f))
        bounds[b] = bounds.get(b, 1.0) * 0.1
    return bounds


def create_state(model, tx, image_shape, seed: int) -> TrainState:
    """Initial state (on the host; place it with `replicate`)."""
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def cross_entropy(logits, labels, num_classes: int, smoothing: float):
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(
    model,
    tx,
    mesh: Mesh,
    *,
    allreduce: str,
    num_classes: int,
    label_smoothing: float = 0.0,
    topology=None,
    bucket_bytes: int = 0,
):
    """jit(shard_map(step)): (state, images, labels) -> (state, {loss, accuracy}).

    `state` is replicated, `images`/`labels` are sharded over the devices along their first
    dimension. The state argument is donated. `topology` goes to jax_ddl.pmean.
    `bucket_bytes` > 0 (jax_ddl only): gradients are averaged inside the backward pass in
    buckets of that size (jax_ddl.sync_gradients); 0: one call after the backward pass.
    """
    if allreduce not in ALLREDUCES and allreduce != NO_REDUCTION:
        raise ValueError(f"--allreduce must be one of {sorted(ALLREDUCES)}; got {allreduce!r}")
    if bucket_bytes > 0 and allreduce != "ddl":
        raise ValueError("gradient buckets need allreduce='ddl' (jax_ddl.sync_gradients)")
    pmean = ALLREDUCES.get(allreduce, lambda tree, axis: tree)
    if topology is not None:
        pmean = functools.partial(pmean, topology=topology)

    def step(state: TrainState, images, labels):
        # Differentiate per-device copies: with invariant parameters, grad would insert
        # its own psum over the devices before ours. (sync_gradients makes them so itself.)
        params = state.params
        if bucket_bytes <= 0 and allreduce != NO_REDUCTION:
            params = jax.lax.pcast(params, AXIS, to="varying")

        def loss_fn(params):
            if bucket_bytes > 0:
                params = jax_ddl.sync_gradients(
                    params, AXIS, bucket_bytes=bucket_bytes, topology=topology
                )
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = cross_entropy(logits, labels, num_classes, label_smoothing)
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels).astype(jnp.float32)

        # The allreduce seam: one call averages gradients, BatchNorm statistics and metrics
        # (with buckets the gradients were averaged in the backward pass already; the
        # statistics wait for them, so that their call does not hold the backward pass up).
        if bucket_bytes > 0:
            batch_stats, loss, accuracy = pmean((batch_stats, loss, accuracy), AXIS, after=grads)
        else:
            grads, batch_stats, loss, accuracy = pmean((grads, batch_stats, loss, accuracy), AXIS)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, {"loss": loss, "accuracy": accuracy}

    sharded = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=allreduce != NO_REDUCTION,  # unreduced values claim to be replicated
    )
    return jax.jit(sharded, donate_argnums=0)


def make_eval_step(model, mesh: Mesh, *, num_classes: int):
    """jit(shard_map): (state, images, labels, mask) -> summed {loss, correct, count}.

    `mask` marks real examples (the last batch of an evaluation set is padded).
    """

    def step(state: TrainState, images, labels, mask):
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
        )
        targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
        losses = optax.softmax_cross_entropy(logits, targets)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        sums = {
            "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(correct.astype(jnp.int32)),
            "count": jnp.sum(mask.astype(jnp.int32)),
        }
        return jax.lax.psum(sums, AXIS)

    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P()
    )
    return jax.jit(sharded)


def global_mesh(devices=None) -> Mesh:
    """A one-axis mesh over every device of every process."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(mesh: Mesh, *local_arrays):
    """Global arrays sharded over the mesh from each process's slice of the batch."""
    sharding = NamedSharding(mesh, P(AXIS))
    n = jax.process_count()
    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (a.shape[0] * n, *a.shape[1:]))
        for a in local_arrays
    )


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
