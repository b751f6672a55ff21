"""Orbax checkpoints of the train state, with the run's identity alongside.

Each checkpoint holds the state (parameters, BatchNorm statistics, optimiser state, step)
and a small JSON record of what produced it (model, width, stem, classes, image shape,
schedule). Restoring into a different model is refused with a message naming the fields
that differ, before any array is read.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

# Fields that fix the shapes of the state: a checkpoint with other values cannot be loaded.
IDENTITY = ("model", "width", "stem", "num_classes", "image_shape")
# Fields that change the run's trajectory: resuming with other values is allowed, warned.
SCHEDULE = ("global_batch", "total_steps", "lr_per_256", "warmup_steps", "decay", "seed", "dataset")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run (message says why and what to do)."""


class Checkpoints:
    """Saves and restores TrainStates under `directory` (async; keeps the newest `keep`)."""

    def __init__(self, directory, meta: dict, keep: int = 2):
        self.directory = pathlib.Path(directory).resolve()
        self.meta = meta
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)
            ),
        )

    def check_compatible(self, step: int) -> list:
        """Raises CheckpointError if checkpoint `step` has another identity; returns
        warnings for schedule fields that differ."""
        saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved = dict(saved["meta"])
        wrong = [k for k in IDENTITY if _norm(saved.get(k)) != _norm(self.meta.get(k))]
        if wrong:
            theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in wrong)
            ours = ", ".join(f"{k}={self.meta.get(k)!r}" for k in wrong)
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} was written by another "
                f"model ({theirs}); this run has {ours}. Resume with the same --model, "
                f"--width, --image-size and data, or use another --checkpoint-dir."
            )
        return [
            f"{k} was {saved.get(k)!r} in the checkpoint, now {self.meta.get(k)!r}"
            for k in SCHEDULE
            if _norm(saved.get(k)) != _norm(self.meta.get(k))
        ]

    def restore(self, step: int, like):
        """The state saved at `step`, placed like `like` (same tree, shapes, shardings)."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
