"""What a run shows and leaves behind: a progress bar (or log lines when not on a
terminal), metrics as JSON lines, a PNG plot of loss and accuracy, and a summary."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np


def read_records(path) -> list:
    """The JSON records of a metrics file. A last line cut short (the run was killed while
    writing it) is left out; a bad line anywhere else is an error naming it."""
    lines = pathlib.Path(path).read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # torn by a crash
            raise ValueError(f"{path}: line {n} is not JSON: {line[:80]!r}") from None
    return records


def _before(record: dict, step: int) -> bool:
    """Whether a record belongs to the run up to `step` (and not past it)."""
    if record.get("kind") == "summary":
        return record.get("last_step", 0) <= step
    return record.get("step", 0) <= step


class MetricsLog:
    """Appends one JSON object per line; `records` keeps them for the plot and summary.
    With `enabled=False` (processes other than the first) it only keeps the records.

    `resume_at=step` continues a run from its checkpoint at `step`: records past it (a
    run that crashed after its last checkpoint wrote them, and will write them again) and
    a torn last line are dropped from the file before new records are appended.
    """

    def __init__(self, path, *, resume_at: int | None = None, enabled: bool = True):
        self.path = pathlib.Path(path)
        self.records: list = []
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None and self.path.exists():
            self.records = [r for r in read_records(self.path) if _before(r, resume_at)]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(self.path, "a" if resume_at is not None else "w")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Progress:
    """A tqdm bar with loss, learning rate and images/s on a terminal; otherwise a plain
    line every `log_every` steps (and at evaluations), so logs stay readable."""

    def __init__(
        self,
        start: int,
        total: int,
        *,
        enabled=None,
        log_every: int = 10,
        stream=None,
        silent: bool = False,
    ):
        self.stream = stream or sys.stderr
        self.silent = silent  # processes other than the first say nothing
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and not silent
        self.log_every = max(1, log_every)
        self.total = total
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream
            )

    def step(self, step: int, loss: float, lr: float, images_per_s: float, extra=""):
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(
                f"loss {loss:.4f} lr {lr:.4g} {images_per_s:,.0f} img/s{extra}", refresh=False
            )
        elif not self.silent and (step % self.log_every == 0 or step == self.total):
            self.log(
                f"step {step}/{self.total} loss {loss:.4f} lr {lr:.4g} "
                f"{images_per_s:,.1f} img/s{extra}"
            )

    def log(self, message: str) -> None:
        if self.silent:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot(records: list, path) -> None:
    """Training loss (raw and smoothed) and train/held-out accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="per step")
        if len(loss) >= 5:
            k = max(2, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(steps[k - 1 :], smooth, color="tab:blue", lw=2, label=f"mean of {k}")
        acc = np.array([r["accuracy"] for r in train])
        ax_acc.plot(steps, acc, color="tab:orange", alpha=0.35, lw=1, label="train (per step)")
    if evals:
        ax_acc.plot(
            [r["step"] for r in evals],
            [r["accuracy"] for r in evals],
            "o-",
            color="tab:green",
            lw=2,
            label="held-out",
        )
    ax_loss.set(xlabel="step", ylabel="training loss", title="Loss")
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_acc.set(xlabel="step", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class StepTimer:
    """Wall time between consecutive completed steps (the first, with compilation, apart)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.times: list = []

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.times.append(dt)
        return dt

    def reset(self) -> None:
        self.last = time.perf_counter()


def summarise(train_records: list, *, global_batch: int, skip: int = 1) -> dict:
    """Median step time, images/s and allreduce share over the steps after `skip`."""
    rows = train_records[skip:] or train_records
    if not rows:
        return {}
    step_time = float(np.median([r["step_time_s"] for r in rows]))
    out = {
        "steps_timed": len(rows),
        "step_time_s": step_time,
        "images_per_s": global_batch / step_time,
    }
    ddl = [r["allreduce_s"] for r in rows if r.get("allreduce_s") is not None]
    if ddl:
        out["allreduce_s"] = float(np.median(ddl))
        out["allreduce_share"] = out["allreduce_s"] / step_time
        out["allreduce_wait_s"] = float(np.median([r["allreduce_wait_s"] for r in rows]))
    return out
