"""A timeline of jax_ddl's calls on CPU devices: when each device reached a call, when its
peers had all arrived, when it completed; and spans the program marks on the same clock.

    with jax_ddl.trace() as t:
        for i in range(3):
            with t.span(f"step {i}"):
                state = train_step(state, batch)
                jax.block_until_ready(state)
    t.save("trace.json")      # Chrome trace events: open in Perfetto or chrome://tracing
    print(t.summary())

It answers the questions a counter cannot: does a gradient bucket's call start inside
the backward pass, how long does it wait for the slowest device, and how much of it
runs after the program's other work has ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

from jax_ddl import _ddl

_active: list = []  # the trace being recorded (at most one per process)


@dataclasses.dataclass(frozen=True)
class CallEvent:
    """One call on one device; times in seconds on the trace's clock (`Trace.now`)."""

    site: str  # the call site: "jax_ddl allreduce (call 3 of jit_step, topology 4x2, ...)"
    rank: int  # rank in the call's plan
    device: int  # local device ordinal
    bytes: int  # bytes this device reduced
    start: float  # XLA reached the call on this device
    met: float | None  # every rank had arrived (None: the call failed before that)
    end: float  # the call completed
    ok: bool
    deferred: bool  # completed on one of jax_ddl's threads rather than XLA's

    @property
    def wait(self) -> float:
        """Seconds from reaching the call until every rank had arrived."""
        return (self.met if self.met is not None else self.end) - self.start

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Span:
    """A stretch of the program, marked with `Trace.span`."""

    name: str
    start: float
    end: float


class Trace:
    """The calls recorded between entering and leaving `jax_ddl.trace()`, with marks."""

    def __init__(self, limit: int):
        self.limit = limit
        self.events: list[CallEvent] = []
        self.spans: list[Span] = []
        self.dropped = 0  # calls past `limit`, not recorded

    @staticmethod
    def now() -> float:
        """Seconds on the clock the engine stamps its events with (monotonic)."""
        return _ddl.trace_now() * 1e-9

    @contextlib.contextmanager
    def span(self, name: str):
        """Marks the block as a span named `name` (for example one training step). Block on
        the results inside it (jax.block_until_ready): JAX dispatches asynchronously."""
        start = self.now()
        try:
            yield
        finally:
            self.spans.append(Span(name, start, self.now()))

    def _collect(self) -> None:
        for site, rank, device, nbytes, start, met, end, ok, deferred in _ddl.trace_take():
            self.events.append(
                CallEvent(
                    site=site,
                    rank=rank,
                    device=device,
                    bytes=nbytes,
                    start=start * 1e-9,
                    met=met * 1e-9 if met else None,
                    end=end * 1e-9,
                    ok=bool(ok),
                    deferred=bool(deferred),
                )
            )
        self.events.sort(key=lambda e: (e.start, e.device))
        self.dropped = _ddl.trace_dropped()

    def in_span(self, span: Span) -> list[CallEvent]:
        """The calls that started inside `span`."""
        return [e for e in self.events if span.start <= e.start <= span.end]

    def summary(self) -> str:
        """Per span: calls, their time per device, and how long the span ran on after the
        first and the last call started; a line for calls outside any span."""
        lines = []
        devices = sorted({e.device for e in self.events}) or [0]
        for sp in self.spans:
            evs = self.in_span(sp)
            if not evs:
                lines.append(f"{sp.name}: {1e3 * (sp.end - sp.start):.1f} ms, no calls")
                continue
            per_dev = sum(e.duration for e in evs) / len(devices)
            wait = sum(e.wait for e in evs) / len(devices)
            first = min(e.start for e in evs)
            last = max(e.start for e in evs)
            lines.append(
                f"{sp.name}: {1e3 * (sp.end - sp.start):.1f} ms; "
                f"{len(evs)} calls on {len(devices)} devices, "
                f"{1e3 * per_dev:.1f} ms in calls per device ({1e3 * wait:.1f} waiting for peers); "
                f"first call at +{1e3 * (first - sp.start):.1f} ms, "
                f"last at +{1e3 * (last - sp.start):.1f} ms, "
                f"last done {1e3 * (sp.end - max(e.end for e in evs)):.1f} ms before the end"
            )
        outside = [
            e for e in self.events if not any(sp.start <= e.start <= sp.end for sp in self.spans)
        ]
        if outside or not self.spans:
            lines.append(f"{len(outside)} calls outside any span")
        if self.dropped:
            lines.append(f"{self.dropped} calls not recorded (over the limit of {self.limit})")
        return "\n".join(lines)

    def chrome_events(self, pid: int = 0) -> list[dict]:
        """The trace as Chrome trace events (microseconds); `pid`: this process's index,
        so that the files of several processes can be merged (same machine: same clock)."""
        out = [
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"process {pid}"}},
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": -1, "args": {"name": "program"}},
        ]
        for dev in sorted({e.device for e in self.events}):
            out.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": dev,
                    "args": {"name": f"device {dev}"},
                }
            )
        for sp in self.spans:
            out.append(
                {
                    "name": sp.name,
                    "ph": "X",
                    "pid": pid,
                    "tid": -1,
                    "ts": sp.start * 1e6,
                    "dur": (sp.end - sp.start) * 1e6,
                }
            )
        for e in self.events:
            args = {
                "site": e.site,
                "rank": e.rank,
                "bytes": e.bytes,
                "ok": e.ok,
                "deferred": e.deferred,
            }
            met = e.met if e.met is not None else e.end
            out.append(
                {
                    "name": "wait for peers",
                    "ph": "X",
                    "pid": pid,
                    "tid": e.device,
                    "ts": e.start * 1e6,
                    "dur": (met - e.start) * 1e6,
                    "args": args,
                }
            )
            if e.met is not None:
                out.append(
                    {
                        "name": "allreduce" if e.ok else "allreduce (failed)",
                        "ph": "X",
                        "pid": pid,
                        "tid": e.device,
                        "ts": e.met * 1e6,
                        "dur": (e.end - e.met) * 1e6,
                        "args": args,
                    }
                )
        return out

    def save(self, path: str | os.PathLike, pid: int | None = None) -> None:
        """Writes Chrome trace-event JSON (Perfetto, chrome://tracing). `pid` defaults to
        this process's index under jax.distributed."""
        if pid is None:
            import jax

            pid = jax.process_index()
        with open(path, "w") as f:
            json.dump({"traceEvents": self.chrome_events(pid), "displayTimeUnit": "ms"}, f)


@contextlib.contextmanager
def trace(limit: int = 1_000_000):
    """Records the jax_ddl calls of this process on CPU devices while the block runs (at
    most `limit` events, one per call per device; more are counted in `Trace.dropped`):
    every call that reduces over more than one rank and gets past the checks of its
    arguments. Yields a `Trace`, filled when the block exits. Calls still running then are
    not recorded: block on the results inside the block."""
    if _active:
        raise RuntimeError(
            "jax_ddl.trace: a trace is already being recorded in this process; one at a time"
        )
    if limit < 1:
        raise ValueError(f"jax_ddl.trace: limit must be at least 1, got {limit}")
    t = Trace(limit)
    _active.append(t)
    _ddl.trace_enable(True, limit)
    try:
        yield t
    finally:
        _ddl.trace_enable(False, limit)
        _active.clear()
        t._collect()
