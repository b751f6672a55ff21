#!/usr/bin/env python3
"""When every device reached each jax_ddl call of one step, from bench_train.py --trace.

    python tools/trace_table.py docs/results/trace-resnet50-1gbit.json --mode ddl-buckets

Reads FILE (process 0) and FILE.p1, FILE.p2, ... (the other processes of the launch, on
one machine: the same clock) and prints, for the chosen step of the mode (a span of
process 0), one row per call site in the order the calls were first reached: its bytes
per device, the time each device reached it (ms from the step's start; columns
p<process>d<device>), and when the last device completed it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(path: str) -> list[dict]:
    files = [path]
    i = 1
    while os.path.exists(f"{path}.p{i}"):
        files.append(f"{path}.p{i}")
        i += 1
    events = []
    for f in files:
        with open(f) as fh:
            events += json.load(fh)["traceEvents"]
    return events


def table(events: list[dict], mode: str, step: int) -> str:
    spans = [e for e in events if e.get("ph") == "X" and e.get("tid") == -1 and e.get("pid") == 0]
    names = sorted({e["name"] for e in spans})
    chosen = [e for e in spans if e["name"] == mode]
    if not chosen:
        raise SystemExit(f"trace_table.py: no step of mode {mode!r}; the trace has {names}")
    if not 0 <= step < len(chosen):
        raise SystemExit(f"trace_table.py: --step {step}: mode {mode!r} has {len(chosen)} steps")
    sp = chosen[step]
    t0, t1 = sp["ts"], sp["ts"] + sp["dur"]
    reach, done, size = {}, {}, {}
    for e in events:
        if e.get("ph") != "X" or e.get("tid", -1) < 0 or not t0 <= e["ts"] <= t1:
            continue
        site = e["args"]["site"]
        key = (e["pid"], e["tid"])
        size[site] = e["args"]["bytes"]
        if e["name"] == "wait for peers":
            reach.setdefault(site, {})[key] = (e["ts"] - t0) / 1e3
        done[site] = max(done.get(site, 0.0), (e["ts"] + e["dur"] - t0) / 1e3)
    cols = sorted({k for r in reach.values() for k in r})
    lines = [
        f"{mode}, step {step}: {sp['dur'] / 1e3:.1f} ms; ms from the step's start when each "
        "device reached the call, and when the last device completed it",
        f"{'call':>6} {'MiB':>6} " + " ".join(f"p{p}d{d}".rjust(7) for p, d in cols) + "    done",
    ]
    for site in sorted(reach, key=lambda s: min(reach[s].values())):
        number = site.split("call ")[1].split(" ")[0] if "call " in site else "?"
        cells = " ".join(f"{reach[site][k]:7.0f}" if k in reach[site] else "      -" for k in cols)
        lines.append(f"{number:>6} {size[site] / 2**20:6.2f} {cells} {done[site]:7.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="trace_table.py", description=__doc__.split("\n")[0])
    p.add_argument("file", help="a trace written by examples/bench_train.py --trace")
    p.add_argument("--mode", default="ddl-buckets", help="the step's mode (span name)")
    p.add_argument("--step", type=int, default=0, help="which timed step of the mode")
    args = p.parse_args(argv)
    print(table(load(args.file), args.mode, args.step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
