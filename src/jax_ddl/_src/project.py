"""Projection of data-parallel scaling efficiency on GPU clusters from a scenario file.

A scenario describes a cluster and a model's training step with sourced inputs, each a
nominal value and a plausible range (never tuned to a published figure):

    {
      "name": "...", "sources": {...},
      "devices_per_host": 4,
      "gpus": [1, 4, 8, 16, 32, 64, 128, 256],
      "published": [{"gpus": 256, "efficiency": 0.95, "what": "...", "source": "..."}],
      "inputs": {
        "intra_bandwidth_GBps": {"nominal": 40, "range": [20, 60], "source": "..."},
        "intra_latency_us":     {...},
        "inter_bandwidth_Gbps": {...},   # per host, each way
        "inter_latency_us":     {...},
        "compute_ms":           {...},   # forward + backward of one GPU's batch
        "backward_fraction":    {...},   # share of compute_ms in the backward pass
        "call_overhead_us":     {...},   # software cost per allreduce call
        "gradient_MB":          {...},   # bytes of gradients per step (dtype included)
        "buckets":              {...}    # allreduce calls per step (fusion buffers)
      },
      "overlap": true                    # what the published system did
    }

Per step: T = compute + exposed communication. The allreduce of G bytes in B buckets:

- topology-aware (DDL: devices_per_host x hosts): inside a host a ring reduce-scatter and
  all-gather over d GPUs, 2(d-1) steps of (a_intra + G/(B d) / bw_intra); between hosts the
  same over H hosts on the slice G/d, all d GPUs of a host sharing the host's links:
  2(H-1) steps of (a_inter + G/(B H) / bw_inter), per bucket.
- flat ring over all P GPUs (host-major order, so one GPU per host sends across hosts in
  each step): 2(P-1) steps of (max latency + G/(B P) / min(bw_intra, bw_inter)).
- overlap on: the buckets but the last run under the backward pass,
  exposed = max(T_comm - backward, T_comm / B); off: all of T_comm is exposed.

Efficiency = compute / (compute + exposed): against one GPU's step.
"""

from __future__ import annotations

import itertools
import math

PLANS = ("aware", "flat ring")
ALGORITHMS = ("ring", "halving-doubling")
INPUTS = (
    "intra_bandwidth_GBps",
    "intra_latency_us",
    "inter_bandwidth_Gbps",
    "inter_latency_us",
    "compute_ms",
    "backward_fraction",
    "call_overhead_us",
    "gradient_MB",
    "buckets",
)


def load(path: str) -> dict:
    from jax_ddl._src.model import read_json

    sc = read_json(path, "scenario")
    check(sc, path)
    return sc


def check(sc, source: str = "scenario") -> None:
    """Raises ValueError naming the field of `sc` that is missing or wrong."""

    def fail(what):
        raise ValueError(f"{source}: {what} (see docs/scenarios/*.json for the format)")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(sc, dict):
        fail("a scenario is a JSON object")
    missing = [k for k in ("name", "devices_per_host", "gpus", "inputs") if k not in sc]
    if missing:
        fail(f"missing {missing}")
    d = sc["devices_per_host"]
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        fail(f"devices_per_host must be a positive int; got {d!r}")
    gpus = sc["gpus"]
    if (
        not isinstance(gpus, list)
        or not gpus
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in gpus)
    ):
        fail(f"gpus must be a list of positive ints; got {gpus!r}")
    if sc.get("plan", "aware") not in PLANS:
        fail(f"plan must be one of {list(PLANS)}; got {sc.get('plan')!r}")
    if sc.get("inter_algorithm", "ring") not in ALGORITHMS:
        fail(f"inter_algorithm must be one of {list(ALGORITHMS)}; got {sc['inter_algorithm']!r}")
    if sc.get("overlap") not in (True, False, None):
        fail(f"overlap must be true, false or null (unknown); got {sc['overlap']!r}")
    inputs = sc["inputs"]
    if not isinstance(inputs, dict):
        fail("inputs must be an object of {name: {nominal, range, source}}")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        fail(f"unknown inputs {unknown} (known: {list(INPUTS)})")
    for k in INPUTS:
        v = inputs.get(k)
        if not isinstance(v, dict) or "nominal" not in v or "range" not in v:
            fail(
                f"inputs.{k} must be {{'nominal': x, 'range': [lo, hi], 'source': '...'}}; "
                f"got {v!r}"
            )
        r = v["range"]
        if not number(v["nominal"]) or not (
            isinstance(r, list) and len(r) == 2 and all(number(x) for x in r)
        ):
            fail(f"inputs.{k}: nominal must be a number and range [low, high]; got {v!r}")
        if not r[0] <= v["nominal"] <= r[1] or r[0] < 0:
            fail(f"inputs.{k}: nominal {v['nominal']} outside its range {r} (or negative)")
        if not v.get("source"):
            fail(f"inputs.{k} has no source")
    for k in ("intra_bandwidth_GBps", "inter_bandwidth_Gbps", "compute_ms", "buckets"):
        if inputs[k]["range"][0] <= 0:
            fail(f"inputs.{k} must be > 0 over its whole range")
    for i, pub in enumerate(sc.get("published", [])):
        if not isinstance(pub, dict) or not all(k in pub for k in ("gpus", "efficiency")):
            fail(f"published[{i}] needs gpus and efficiency")
        for k in ("gpus", "baseline_gpus"):
            if k in pub and pub[k] not in gpus:
                fail(f"published[{i}].{k} = {pub[k]!r} is not among gpus {gpus}")
        if not number(pub["efficiency"]) or not 0 < pub["efficiency"] <= 1:
            fail(f"published[{i}].efficiency must be in (0, 1]; got {pub['efficiency']!r}")


def allreduce_s(x: dict, gpus: int, d: int, aware: bool) -> float:
    """Seconds of one step's gradient allreduce over `gpus` GPUs, d per host."""
    if gpus <= 1:
        return 0.0
    d = min(d, gpus)
    hosts = math.ceil(gpus / d)
    buckets = max(1, round(x["buckets"]))
    per = x["gradient_MB"] * 1e6 / buckets
    bw_i = x["intra_bandwidth_GBps"] * 1e9
    bw_n = x["inter_bandwidth_Gbps"] * 1e9 / 8
    a_i = x["intra_latency_us"] * 1e-6
    a_n = x["inter_latency_us"] * 1e-6
    call = x["call_overhead_us"] * 1e-6
    if aware:
        t = 0.0
        if d > 1:
            t += 2 * (d - 1) * (a_i + per / d / bw_i)
        if hosts > 1 and x.get("inter_algorithm", "ring") == "halving-doubling":
            # Recursive halving / doubling: 2 log2(H) steps, the same bytes per host.
            t += 2 * math.ceil(math.log2(hosts)) * a_n + 2 * (hosts - 1) / hosts * per / bw_n
        elif hosts > 1:
            t += 2 * (hosts - 1) * (a_n + per / hosts / bw_n)
    else:
        bw = bw_i if hosts == 1 else min(bw_i, bw_n)
        a = a_i if hosts == 1 else max(a_i, a_n)
        t = 2 * (gpus - 1) * (a + per / gpus / bw)
    return buckets * (t + call)


def efficiency(x: dict, gpus: int, d: int, aware: bool, overlap: bool) -> float:
    compute = x["compute_ms"] * 1e-3
    comm = allreduce_s(x, gpus, d, aware)
    if overlap:
        buckets = max(1, round(x["buckets"]))
        exposed = max(comm - x["backward_fraction"] * compute, comm / buckets)
    else:
        exposed = comm
    return compute / (compute + exposed)


def project(sc: dict) -> list[dict]:
    """For every GPU count, plan (aware / flat) and overlap (on / off): the efficiency at
    the nominal inputs and its interval over every corner of the inputs' ranges."""
    inputs = sc["inputs"]
    nominal = {k: inputs[k]["nominal"] for k in INPUTS}
    nominal["inter_algorithm"] = sc.get("inter_algorithm", "ring")
    ranged = [k for k in INPUTS if inputs[k]["range"][0] != inputs[k]["range"][1]]
    corners = []
    for combo in itertools.product((0, 1), repeat=len(ranged)):
        x = dict(nominal)
        for k, side in zip(ranged, combo):
            x[k] = inputs[k]["range"][side]
        corners.append(x)
    d = sc["devices_per_host"]
    rows = []
    for gpus in sc["gpus"]:
        for aware in (True, False):
            for overlap in (True, False):
                vals = [efficiency(x, gpus, d, aware, overlap) for x in corners]
                rows.append(
                    {
                        "gpus": gpus,
                        "plan": "aware" if aware else "flat ring",
                        "overlap": overlap,
                        "efficiency": efficiency(nominal, gpus, d, aware, overlap),
                        "low": min(vals),
                        "high": max(vals),
                        "allreduce_ms": allreduce_s(nominal, gpus, d, aware) * 1e3,
                    }
                )
    return rows


def report(sc: dict, rows: list[dict]) -> str:
    lines = [f"# {sc['name']}: {sc['devices_per_host']} GPUs per host"]
    lines.append(
        f"# {'gpus':>5} {'plan':>9} {'overlap':>7} {'allreduce':>10} {'efficiency':>10} "
        f"{'interval':>15}"
    )
    for r in rows:
        lines.append(
            f"  {r['gpus']:>5} {r['plan']:>9} {'on' if r['overlap'] else 'off':>7} "
            f"{r['allreduce_ms']:>8.1f}ms {100 * r['efficiency']:>9.1f}% "
            f"{100 * r['low']:>6.1f}-{100 * r['high']:>5.1f}%"
        )
    for pub in sc.get("published", []):
        lines.append(compare(sc, rows, pub)["text"])
    return "\n".join(lines)


def compare(sc: dict, rows: list[dict], pub: dict) -> dict:
    """The published figure beside the prediction for the published system's plan and
    overlap (both overlaps when the scenario does not know), relative to the same baseline
    GPU count as the publication."""
    plan = sc.get("plan", "aware")
    overlaps = [True, False] if sc.get("overlap") is None else [bool(sc["overlap"])]
    base = pub.get("baseline_gpus", 1)

    def at(gpus, overlap, key):
        for r in rows:
            if r["gpus"] == gpus and r["plan"] == plan and r["overlap"] == overlap:
                return r[key]
        raise ValueError(f"{sc['name']}: no projection at {gpus} GPUs (add it to 'gpus')")

    # Interval: each bound against the baseline at the same corner is not tracked, so the
    # bounds are taken against the nominal baseline (the baseline is at most one host,
    # where the network does not enter).
    nominal = [at(pub["gpus"], o, "efficiency") / at(base, o, "efficiency") for o in overlaps]
    low = min(at(pub["gpus"], o, "low") / at(base, o, "efficiency") for o in overlaps)
    high = max(at(pub["gpus"], o, "high") / at(base, o, "efficiency") for o in overlaps)
    high = min(high, 1.0)
    miss = 0.0
    if pub["efficiency"] < low:
        miss = pub["efficiency"] - low
    elif pub["efficiency"] > high:
        miss = pub["efficiency"] - high
    overlap_text = "on/off" if len(overlaps) == 2 else ("on" if overlaps[0] else "off")
    text = (
        f"# published {100 * pub['efficiency']:.0f}% at {pub['gpus']} GPUs against "
        f"{base} ({pub.get('what', '')}); predicted for {plan}, overlap {overlap_text}: "
        + " / ".join(f"{100 * v:.1f}%" for v in nominal)
        + f", interval [{100 * low:.1f}, {100 * high:.1f}]"
        + (f"; outside by {100 * miss:+.1f} points" if miss else "; inside")
    )
    return {
        "published": pub["efficiency"],
        "gpus": pub["gpus"],
        "baseline_gpus": base,
        "predicted": nominal,
        "low": low,
        "high": high,
        "miss_points": 100 * miss,
        "text": text,
    }
