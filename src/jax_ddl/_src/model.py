"""jax_ddl's cost model: the time of one allreduce for a grid, a placement and a profile.

The model follows the engine (docs/design.md) stage by stage and charges each stage for
the resources it uses, with alpha-beta(-gamma) terms per transport level (Thakur,
Rabenseifner & Gropp 2005), plus the terms the calibration showed matter on CPUs:

- local work (shared memory inside a process): the bytes the plan reads and writes,
  at the process's memory bandwidth for copies and its reduction throughput for the
  dtype (reads + writes per second, measured with every process of the launch working);
- messages between processes: for every exchange, the bytes each host sends to other
  hosts (at the `network` level's per-host bandwidth) and the bytes its processes send
  to each other (at the `host` level's), each plus the level's latency; an exchange
  takes as long as its slowest host; between hosts the bandwidth is the one measured with
  as many messages in flight per process (DDL's pattern and the flat plan's);
- DDL's hierarchy across processes is pipelined in chunks (`JAX_DDL_CHUNK_BYTES`):
  local work and messages overlap, a pipeline of m chunks takes
  local + messages - w * min(local, messages) * (m - 1) / m, where w (calibrated, 0..1)
  is how far memory work and messages can run at once on this machine (1: the link paces
  itself, as a NIC does; 0: the network stack needs the same cores as the memory work);
- a fixed cost per call (dispatch, arrival, the handshake and completion rounds across
  processes: a measured small call less the latencies the model charges it), and out of
  place the page faults of the fresh output buffers (per byte, measured per size: glibc
  maps large blocks fresh on every allocation).

Pure Python; no jax import. `predict` is the entry point; `candidates` lists the grids a
placement allows, `explain` ranks them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

LEVELS = ("host", "network")
DTYPE_BYTES = {
    "float32": 4,
    "float64": 8,
    "bfloat16": 2,
    "float16": 2,
    "int32": 4,
    "int64": 8,
}
# Accumulator bytes per element: 16-bit floats accumulate in float32 (docs/design.md).
ACC_BYTES = {"bfloat16": 4, "float16": 4}
MAX_CHUNKS = 64
MAX_PHASES = 128  # ffi/rendezvous.h kMaxPhases: barriers of one call
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_SMALL_BYTES = 16 << 10
# topology="auto" keeps the default grid unless another is predicted faster by more than
# this fraction, about the model's median error on this project's validation runs (10 % to
# 15 % by setup, docs/model.md): smaller predicted gains are not real gains.
AUTO_MARGIN = 0.15


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the ranks run: `hosts` x `processes_per_host` x `devices_per_process`.

    Ranks are numbered device-fastest, then process, then host (jax's process-major device
    order): rank r is device r % D of process (r // D) % P of host r // (D * P)."""

    hosts: int = 1
    processes_per_host: int = 1
    devices_per_process: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Placement.{f.name} must be a positive int; got {v!r}")

    @property
    def ranks(self) -> int:
        return self.hosts * self.processes_per_host * self.devices_per_process

    @property
    def processes(self) -> int:
        return self.hosts * self.processes_per_host

    def where(self, rank: int) -> tuple[int, int]:
        """(host, process) of a rank; processes numbered globally."""
        proc = rank // self.devices_per_process
        return proc // self.processes_per_host, proc

    def label(self) -> str:
        return f"{self.hosts}x{self.processes_per_host}x{self.devices_per_process}"

    @classmethod
    def parse(cls, text: str) -> Placement:
        """ "2x1x4" (hosts x processes per host x devices per process)."""
        try:
            h, p, d = (int(x) for x in str(text).lower().split("x"))
        except ValueError:
            raise ValueError(
                f"placement must be HOSTSxPROCESSESxDEVICES, e.g. '2x1x4'; got {text!r}"
            ) from None
        return cls(h, p, d)


def _log_interp(points, x: float) -> float:
    """The value at `x` on (size, value) points: interpolated in log(size), held flat
    beyond the ends."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (s0, v0), (s1, v1) in itertools.pairwise(pts):
        if x <= s1:
            w = (math.log(x) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return v0 + w * (v1 - v0)
    return pts[-1][1]


@dataclasses.dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth_Bps: float  # bytes per second one host sends at this level, all its processes at once
    # (bytes per message, bytes per second per host) as measured, messages one per device
    # slot to each peer at once; bandwidth_Bps where empty.
    curve: tuple = ()
    # Messages each process had in flight to this level's peers when `curve` was measured
    # (0: not recorded).
    streams: int = 0
    # The same measured with many more messages in flight (every device slot to every
    # device slot of every peer process, as the flat plan sends), and how many per process.
    # Over TCP a process that polls MPI between other work moves more per poll with more
    # messages in flight: at 10 Gbit/s here 1.1-1.9x the per-host rate at 0.5-2 MiB.
    fan_curve: tuple = ()
    fan_streams: int = 0
    # The latency (8 bytes) in that pattern; 0: not measured (latency_s for every count).
    fan_latency_s: float = 0.0

    def latency(self, streams: float = 0) -> float:
        """Latency of an exchange with `streams` messages per process in flight: each
        message costs the processes' CPUs (on this 2-core machine with 8 processes, 8-byte
        exchanges took 0.32 ms with one message per process and more with several).
        Linear in the count between latency_s (one message) and fan_latency_s (fan_streams
        messages), held at the ends."""
        if self.fan_latency_s <= 0 or self.fan_streams <= 1 or streams <= 1:
            return self.latency_s
        if streams >= self.fan_streams:
            return self.fan_latency_s
        w = (streams - 1) / (self.fan_streams - 1)
        return self.latency_s + w * (self.fan_latency_s - self.latency_s)

    def rate(self, message_bytes: float, streams: float = 0) -> float:
        """Bandwidth for messages of this size: interpolated in log(size) on the curve,
        held flat beyond its ends. With `streams` (messages per process in flight at once)
        and both curves measured with known counts: the curve's rate up to its own count,
        the fan curve's from its count on, interpolated in log(streams) between."""
        if not self.curve:
            return self.bandwidth_Bps
        base = _log_interp(self.curve, message_bytes)
        if (
            not self.fan_curve
            or self.streams <= 0
            or streams <= self.streams
            or self.fan_streams <= self.streams
        ):
            return base
        fan = _log_interp(self.fan_curve, message_bytes)
        if streams >= self.fan_streams:
            return fan
        w = math.log(streams / self.streams) / math.log(self.fan_streams / self.streams)
        return base + w * (fan - base)


@dataclasses.dataclass
class Profile:
    """Calibrated cost terms (python -m jax_ddl.calibrate writes them as JSON).

    Rates are per process while every process of the launch works at once."""

    copy_Bps: float  # memory copy, reads + writes per second, one process's device threads
    reduce_Bps: dict  # dtype -> reduction throughput (reads + writes per second)
    # Fixed cost of one call in this launch (dispatch, arrival, handshake and completion
    # rounds): a measured 8-byte call of the default grid less the latencies and barriers
    # the model charges that call itself (fixed_cost), so that those are charged per grid.
    call_s: float
    barrier_s: float  # one shared-memory stage (a barrier among the local devices)
    links: dict  # level ("host", "network") -> Link
    faults: list  # [(bytes per device, seconds per byte of fresh output)], sorted by size
    overlap: float = 1.0  # how far memory work and messages overlap (1 full, 0 none)
    # float32 reduction throughput by the kernel's shape, (sources, destinations) -> reads
    # + writes per second: a stage reduces its group's p copies into one partial result,
    # the last stage into every rank's output; used relative to its (4, 1) entry
    # (stage_rate). Empty: reduce_Bps for every shape.
    reduce_shapes: dict = dataclasses.field(default_factory=dict)
    placement: Placement | None = None  # the launch it was measured in
    meta: dict = dataclasses.field(default_factory=dict)

    def reduce_rate(self, dtype: str) -> float:
        if dtype in self.reduce_Bps:
            return self.reduce_Bps[dtype]
        same = [v for k, v in self.reduce_Bps.items() if DTYPE_BYTES.get(k) == DTYPE_BYTES[dtype]]
        return same[0] if same else self.copy_Bps

    def stage_rate(self, dtype: str, sources: int, destinations: int = 1) -> float:
        """Reduction throughput of a stage of this shape: the dtype's rate (reduce_Bps, 4
        sources into 1) times the shape's factor, the float32 rate measured for the same
        kind of destination (one, or several) and the nearest number of sources (in log)
        against the same table's 4 sources into 1. The table is used for how the rate
        changes with the shape, not for its level: its kernel writes into buffers of its
        own, while the engine in place writes into lines it has just read, which ran
        1.3-1.5x faster here (docs/model.md)."""
        red = self.reduce_rate(dtype)
        same = [(p, r) for (p, q), r in self.reduce_shapes.items() if (q > 1) == (destinations > 1)]
        ref = self.reduce_shapes.get((4, 1))
        if not same or not ref:
            return red
        _, rate = min(same, key=lambda pr: (abs(math.log(pr[0] / max(1, sources))), pr[0]))
        return red * rate / ref

    def fault_s_per_byte(self, nbytes: int) -> float:
        """Interpolated in log(size) between the measured sizes, held flat outside them."""
        return max(0.0, _log_interp(self.faults, nbytes)) if self.faults else 0.0

    def to_json(self) -> dict:
        return {
            "version": 2,
            "copy_Bps": self.copy_Bps,
            "reduce_Bps": dict(self.reduce_Bps),
            "call_s": self.call_s,
            "barrier_s": self.barrier_s,
            "overlap": self.overlap,
            "reduce_shapes": [[p, q, r] for (p, q), r in sorted(self.reduce_shapes.items())],
            "links": {
                k: {
                    **dataclasses.asdict(v),
                    "curve": [list(p) for p in v.curve],
                    "fan_curve": [list(p) for p in v.fan_curve],
                }
                for k, v in self.links.items()
            },
            "faults": [list(p) for p in self.faults],
            "placement": None if self.placement is None else self.placement.label(),
            "meta": {k: v for k, v in self.meta.items() if k != "path"},
        }

    @classmethod
    def from_json(cls, d: dict, source: str = "profile") -> Profile:
        try:
            version = d.get("version")
            if version not in (1, 2):
                raise ValueError(f"version {version!r}, expected 1 or 2")
            links = {
                k: Link(
                    float(v["latency_s"]),
                    float(v["bandwidth_Bps"]),
                    tuple((int(m), float(b)) for m, b in v.get("curve", [])),
                    int(v.get("streams", 0)),
                    tuple((int(m), float(b)) for m, b in v.get("fan_curve", [])),
                    int(v.get("fan_streams", 0)),
                    float(v.get("fan_latency_s", 0.0)),
                )
                for k, v in d["links"].items()
            }

            unknown = set(links) - set(LEVELS)
            if unknown:
                raise ValueError(f"unknown link levels {sorted(unknown)} (known: {list(LEVELS)})")
            p = cls(
                copy_Bps=float(d["copy_Bps"]),
                reduce_Bps={k: float(v) for k, v in d["reduce_Bps"].items()},
                call_s=float(d["call_s"]),
                barrier_s=float(d["barrier_s"]),
                overlap=float(d.get("overlap", 1.0)),
                reduce_shapes={
                    (int(p), int(q)): float(r) for p, q, r in d.get("reduce_shapes", [])
                },
                links=links,
                faults=sorted((int(s), float(v)) for s, v in d.get("faults", [])),
                placement=Placement.parse(d["placement"]) if d.get("placement") else None,
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{source} is not a jax_ddl profile ({type(e).__name__}: {e}); write one with "
                "python -m jax_ddl.calibrate --out FILE"
            ) from None
        problems = []
        if (
            p.copy_Bps <= 0
            or any(v <= 0 for v in p.reduce_Bps.values())
            or any(v <= 0 or min(k) < 1 for k, v in p.reduce_shapes.items())
        ):
            problems.append("copy and reduction rates must be > 0")
        for level in LEVELS:
            link = p.links.get(level)
            if link is None:
                problems.append(f"links.{level} is missing")
            elif (
                link.bandwidth_Bps <= 0
                or link.latency_s < 0
                or link.fan_latency_s < 0
                or any(b <= 0 for _, b in link.curve + link.fan_curve)
                or link.streams < 0
                or link.fan_streams < 0
            ):
                problems.append(
                    f"links.{level} needs bandwidths > 0, latencies >= 0 and stream counts >= 0"
                )
        if p.call_s < 0 or p.barrier_s < 0 or any(v < 0 for _, v in p.faults):
            problems.append("call_s, barrier_s and page-fault costs must be >= 0")
        if not 0 <= p.overlap <= 1:
            problems.append(f"overlap must be in [0, 1]; got {p.overlap}")
        if problems:
            raise ValueError(
                f"{source}: " + "; ".join(problems) + " (python -m jax_ddl.calibrate writes "
                "a complete profile)"
            )
        if version == 1 and p.placement is not None:
            # Version 1 kept the measured 8-byte call whole, and the model charged its
            # exchanges' latencies on top of it.
            p.meta.setdefault("call_measured_s", p.call_s)
            p.call_s = fixed_cost(p.call_s, p.placement, p)
        return p

    @classmethod
    def load(cls, path: str) -> Profile:
        p = cls.from_json(read_json(path, "profile"), source=f"the profile {path!r}")
        p.meta["path"] = path
        return p

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


def read_json(path: str, what: str):
    """The JSON in `path`; a ValueError naming the file and `what` it should hold."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the {what} {path!r} is not JSON: {e}") from None


def default_profile() -> Profile:
    """Built-in terms for when no profile is given: a typical recent x86 server (memory
    10 GB/s of copy per process, reductions at the same rate), MPI between the processes
    of a host through shared memory (5 GB/s per host, 5 us), 10 Gbit/s Ethernet between
    hosts (1.1 GB/s per host, 30 us). Calibrate for real numbers."""
    return Profile(
        copy_Bps=10e9,
        reduce_Bps={
            "float32": 10e9,
            "float64": 10e9,
            "int32": 10e9,
            "int64": 10e9,
            "bfloat16": 6e9,
            "float16": 6e9,
        },
        call_s=200e-6,
        barrier_s=20e-6,
        links={"host": Link(5e-6, 5e9), "network": Link(30e-6, 1.1e9)},
        faults=[],
        meta={"source": "built-in default (jax_ddl.model.default_profile)"},
    )


def profile_from_env() -> Profile:
    """JAX_DDL_PROFILE (a calibrated JSON file) or the built-in default."""
    path = os.environ.get("JAX_DDL_PROFILE")
    if path:
        try:
            return Profile.load(path)
        except ValueError as e:
            raise ValueError(f"JAX_DDL_PROFILE: {e}") from None
    return default_profile()


# --- the plan's traffic -------------------------------------------------------------------


def _regions(nbytes: float, dims) -> list[float]:
    """Bytes a rank holds entering each stage of `dims` (balanced split, as the plan)."""
    out, n = [], float(nbytes)
    for d in dims:
        out.append(n)
        n /= d
    return out


def _exchange(
    placement: Placement, dims, stage: int, per_peer: float, members=None
) -> tuple[float, float, float]:
    """(bytes to other hosts, bytes to other processes of the same host, messages to other
    hosts per process) of the busiest host, when every rank of a stage of `dims` sends
    `per_peer` bytes to each peer of its group.

    `members` maps a plan rank to a global rank (None: the identity)."""
    strides = [math.prod(dims[:i]) for i in range(len(dims))]
    ranks = math.prod(dims)
    stride, p = strides[stage], dims[stage]
    net: dict[int, float] = {}
    host: dict[int, float] = {}
    for r in range(ranks):
        me = members(r) if members else r
        h, proc = placement.where(me)
        c = (r // stride) % p
        for q in range(p):
            if q == c:
                continue
            peer = r + (q - c) * stride
            ph, pproc = placement.where(members(peer) if members else peer)
            if ph != h:
                net[h] = net.get(h, 0.0) + per_peer
            elif pproc != proc:
                host[h] = host.get(h, 0.0) + per_peer
    busiest = max(net.values(), default=0.0)
    streams = busiest / per_peer / placement.processes_per_host if per_peer > 0 else 0.0
    return busiest, max(host.values(), default=0.0), streams


def _link_time(
    profile: Profile, net_bytes: float, host_bytes: float, message: float, streams: float = 0
) -> float:
    """Seconds of one exchange: the busiest host's bytes at each level, at the bandwidth
    the level has for messages of `message` bytes, the slower of the two, plus the levels'
    latencies (between hosts both for `streams` messages in flight per process). The
    latencies add: each is mostly what the processes' CPUs spend per message, and one
    process posts and polls the messages of both levels (on 2 emulated hosts x 4
    single-device processes, 8-byte exchanges with 4 messages between hosts took 0.68 ms,
    with the 3 other processes of the host 0.42 ms, and the flat plan's exchanges of both
    about 1.1 ms)."""
    latency = wire = 0.0
    if net_bytes > 0:
        link = profile.links["network"]
        latency += link.latency(streams)
        wire = max(wire, net_bytes / link.rate(message, streams))
    if host_bytes > 0:
        link = profile.links.get("host", profile.links["network"])
        latency += link.latency_s
        wire = max(wire, host_bytes / link.rate(message))
    return latency + wire


def mode_of(dims, placement: Placement) -> str:
    """The engine's path for a grid (ffi/site.cc): "local" (one process), "across" (DDL's
    hierarchy: leading dimensions multiply to the devices of a process; pipelined) or
    "spanning" (groups that mix local and remote peers; stage by stage)."""
    if placement.processes == 1:
        return "local"
    prod, i = 1, 0
    while i < len(dims) and prod < placement.devices_per_process:
        prod *= dims[i]
        i += 1
    return "across" if prod == placement.devices_per_process else "spanning"


def predict(
    nbytes: int,
    dims,
    placement: Placement,
    profile: Profile,
    *,
    dtype: str = "float32",
    inplace: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    small_bytes: int = DEFAULT_SMALL_BYTES,
) -> dict:
    """Predicted seconds for one allreduce of `nbytes` per device over the grid `dims`.

    Returns {"time_s", "mode", "local_s", "messages_s", "fixed_s", "faults_s", "chunks"}.
    """
    dims = tuple(int(d) for d in dims)
    if math.prod(dims) != placement.ranks:
        raise ValueError(
            f"grid {'x'.join(map(str, dims))} multiplies to {math.prod(dims)}, but the "
            f"placement {placement.label()} has {placement.ranks} ranks"
        )
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}; got {dtype!r}")
    S = float(nbytes)
    D = placement.devices_per_process
    acc = ACC_BYTES.get(dtype, DTYPE_BYTES[dtype]) / DTYPE_BYTES[dtype]  # scratch bytes ratio
    red = profile.reduce_rate(dtype)
    copy = profile.copy_Bps
    faults = 0.0 if inplace else D * S * profile.fault_s_per_byte(int(S))
    mode = mode_of(dims, placement)
    out = {"mode": mode, "chunks": 1, "fixed_s": profile.call_s, "faults_s": faults}

    if mode == "local":
        if S <= small_bytes:
            # One barrier: each rank copies its input into staging, then reduces all of
            # them itself into its output.
            per_rank = 2 * S + D * S + S
            local = D * per_rank / red + profile.barrier_s
        else:
            # Stage i: a rank reads its part from its group's buffers (the inputs, then the
            # partial results: float32 for 16-bit types) and writes it, at the last stage
            # into every rank's output, at the kernel's rate for that shape (p sources into
            # one, or into D outputs). Barriers: arrival and after every stage.
            local = (len(dims) + 1) * profile.barrier_s
            for i, (n, p) in enumerate(zip(_regions(S, dims), dims)):
                last = i == len(dims) - 1
                moved = n * (1 if i == 0 else acc) + (S if last else n / p * acc)
                local += D * moved / profile.stage_rate(dtype, p, D if last else 1)
        out.update(local_s=local, messages_s=0.0)
        out["time_s"] = profile.call_s + local + faults
        return out

    if mode == "across":
        k, prod = 0, 1
        while prod < D:
            prod *= dims[k]
            k += 1
        ldims, pdims = dims[:k] or (1,), dims[k:] or (1,)
        chunks = 1
        if chunk_bytes > 0 and S > chunk_bytes:
            local_barriers = max(1, len(ldims) - 1)
            chunks = max(
                1,
                min(MAX_CHUNKS, math.ceil(S / chunk_bytes), (MAX_PHASES - 2) // local_barriers),
            )
        # Local stages (per rank): read the part from the group (inputs, then float32
        # partials for 16-bit types), write it (float32 scratch; the last into the slice
        # this slot takes across processes).
        per_rank_red = 0.0
        for i, (n, p) in enumerate(zip(_regions(S, ldims), ldims)):
            per_rank_red += n * (1 if i == 0 else acc) + n / p * acc
        s = S / D  # the slice a slot takes across processes (dtype bytes; float32 inside)
        per_rank_copy = 0.0
        messages = 0.0
        for j, (m, q) in enumerate(zip(_regions(s, pdims), pdims)):
            if q == 1:
                continue
            part = m / q * acc
            # Reduce-scatter: the q - 1 parts to send copied into frames, the received
            # ones reduced with the own one; all-gather: the own part copied into q - 1
            # frames, the q - 1 received ones copied out.
            per_rank_copy += 3 * 2 * part * (q - 1)
            per_rank_red += (q + 1) * part
            # Every slot of every process sends `part` to each group peer, all slots at
            # once (the slots are symmetric: slot 0's traffic times D).
            net, host, streams = _exchange(placement, pdims, j, part, members=lambda r: r * D)
            net, host = net * D / chunks, host * D / chunks
            messages += 2 * chunks * _link_time(profile, net, host, part / chunks, streams * D)
        # The final slice read once (float32) and written into every local output.
        per_rank_copy += s * acc + S
        local = D * (per_rank_red / red + per_rank_copy / copy) + faults
        # Arrival, a barrier after every local stage but the last per chunk, exit.
        local += ((len(ldims) - 1) * chunks + 2) * profile.barrier_s
        # A pipeline of m chunks hides (m - 1) / m of the shorter of the two behind the
        # longer, as far as the machine lets memory work and messages overlap.
        body = local + messages - profile.overlap * min(local, messages) * (chunks - 1) / chunks
        out.update(local_s=local, messages_s=messages, chunks=chunks)
        out["time_s"] = profile.call_s + body
        return out

    # spanning: every stage over the whole grid, local peers in shared memory, remote ones
    # over MPI in frames; no pipelining.
    local = 0.0
    messages = 0.0
    regions = _regions(S, dims)
    for i, (n, p) in enumerate(zip(regions, dims)):
        if p == 1:
            continue
        last = i == len(dims) - 1
        es = 1 if i == 0 else acc  # reduce-scatter stages after the first carry float32
        part = n / p
        stride = math.prod(dims[:i])
        # Group peers of rank 0 in other processes (their parts go through frames).
        remote = sum(
            1 for q in range(1, p) if placement.where(q * stride)[1] != placement.where(0)[1]
        )
        near = p - 1 - remote
        # Reduce-scatter: the parts for remote peers gathered into frames; the part read
        # from the local peers and the frames, reduced and written (at the last stage
        # into the outputs of the local group peers and its own).
        rs = 2 * remote * part * es + p * part * es + part * (near + 1 if last else acc)
        # All-gather: the own part gathered into each remote peer's frame, the local peers'
        # parts copied from their outputs (not at the last stage), the remote ones
        # scattered out of their frames.
        ag = 2 * remote * part + (0 if last else 2 * near * part) + 2 * remote * part
        local += D * (rs / red + ag / copy)
        net, host, streams = _exchange(placement, dims, i, part)
        messages += _link_time(profile, net * es, host * es, part * es, streams)
        messages += _link_time(profile, net, host, part, streams)
    # Arrival, a barrier after every reduce-scatter stage but the last, one per all-gather.
    local += (2 * len(dims)) * profile.barrier_s + faults
    out.update(local_s=local, messages_s=messages)
    out["time_s"] = profile.call_s + local + messages
    return out


def fixed_cost(measured_s: float, placement: Placement, profile: Profile) -> float:
    """The fixed cost of a call: `measured_s`, the time of an 8-byte call of the default
    grid in this placement (what the calibration measures), less what the model charges
    that call for its exchanges (the levels' latencies) and barriers, which it charges
    every grid by its own stages. (Charging them on top of the whole measured call counted
    them twice: on 2 emulated hosts x 4 single-device processes, 1.4 ms of a 2.9 ms call.)
    Never below zero."""
    bare = dataclasses.replace(profile, call_s=0.0, faults=[])
    charged = predict(8, default_grid(placement), placement, bare)["time_s"]
    return max(0.0, measured_s - charged)


# --- choosing a grid ----------------------------------------------------------------------


def _factorisations(n: int, max_dims: int):
    """Ordered factorisations of n into factors >= 2 (n itself included; () for 1)."""
    if n == 1:
        yield ()
        return
    if max_dims == 0:
        return
    for d in range(2, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, max_dims - 1):
                yield (d, *rest)


def default_grid(placement: Placement) -> tuple[int, ...]:
    """The grid jax_ddl uses when not told (jax_ddl._src.topology.default_dims)."""
    if placement.processes == 1:
        return (placement.ranks,)
    dims = [placement.devices_per_process] if placement.devices_per_process > 1 else []
    if placement.hosts > 1 and placement.processes_per_host > 1:
        dims += [placement.processes_per_host, placement.hosts]
    else:
        dims.append(placement.processes)
    return tuple(dims) if len(dims) > 1 else (placement.ranks,)


def candidates(placement: Placement, max_dims: int = 4, limit: int = 4096) -> list[tuple]:
    """Grids for `placement`: every ordered factorisation of the ranks into at most
    `max_dims` dimensions (the default grid always included)."""
    if placement.ranks == 1:
        return [(1,)]
    out = []
    for dims in _factorisations(placement.ranks, max_dims):
        out.append(dims)
        if len(out) >= limit:
            break
    if not out:
        out = [(placement.ranks,)]
    d = default_grid(placement)
    if d not in out:
        out.append(d)
    return out


def explain(
    nbytes: int,
    placement: Placement,
    profile: Profile | None = None,
    *,
    dtype: str = "float32",
    inplace: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    small_bytes: int = DEFAULT_SMALL_BYTES,
) -> list[dict]:
    """Every candidate grid with its predicted time, fastest first. Each entry:
    {"grid": "4x2", "dims": (4, 2), "time_s", "mode", "default": bool, ...}."""
    profile = profile or default_profile()
    d = default_grid(placement)
    rows = []
    for dims in candidates(placement):
        p = predict(
            nbytes,
            dims,
            placement,
            profile,
            dtype=dtype,
            inplace=inplace,
            chunk_bytes=chunk_bytes,
            small_bytes=small_bytes,
        )
        rows.append({"grid": "x".join(map(str, dims)), "dims": dims, "default": dims == d, **p})
    # Fastest first; on a tie the default grid, then fewer dimensions.
    rows.sort(key=lambda r: (round(r["time_s"], 12), not r["default"], len(r["dims"])))
    # auto leaves the default grid only for a predicted gain beyond the model's error.
    best = rows[0]
    fallback = next(r for r in rows if r["default"])
    chosen = fallback if fallback["time_s"] <= best["time_s"] * (1 + AUTO_MARGIN) else best
    for r in rows:
        r["chosen"] = r is chosen
    return rows


def choose(nbytes: int, placement: Placement, profile: Profile | None = None, **kw) -> tuple:
    """The grid topology="auto" runs: the fastest predicted, unless the default grid is
    predicted within AUTO_MARGIN of it."""
    return next(r["dims"] for r in explain(nbytes, placement, profile, **kw) if r["chosen"])


def explain_launch(
    nbytes: int,
    *,
    placement: Placement | None = None,
    profile: Profile | None = None,
    dtype: str = "float32",
    inplace: bool = True,
) -> list[dict]:
    """jax_ddl.explain: the candidates topology="auto" weighs for a call of `nbytes` per
    device, fastest predicted first, each with "chosen" (what auto runs) and "default".
    Placement: this launch's (every device of every process; hosts as
    jax_ddl.distributed found them); profile: JAX_DDL_PROFILE, else the built-in terms;
    chunk and small-message sizes from the environment, as a call would use."""
    if placement is None:
        import jax

        from jax_ddl._src import topology

        placement = topology.placement(jax.device_count())
    from jax_ddl._src.collectives import chunk_bytes, small_bytes

    return explain(
        nbytes,
        placement,
        profile or profile_from_env(),
        dtype=dtype,
        inplace=inplace,
        chunk_bytes=chunk_bytes(),
        small_bytes=small_bytes(),
    )
