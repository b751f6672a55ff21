"""Step time split into compute and exposed communication, from bench_train.py results.

Each results file (bench_train.py --json, run with `none` among its modes) is one
configuration; each of its modes is a bar: the step time of `none` (the same step without
any reduction: compute) and what the mode adds over it (exposed communication; below zero
when the mode measured faster than `none`).

    python examples/plot_step_split.py --out split.png A.json=label-a B.json=label-b
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(prog="plot_step_split.py", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", metavar="FILE[=LABEL]", help="bench_train.py JSON")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="Step time: compute and exposed communication")
    return p.parse_args(argv)


def load(spec: str):
    path, _, label = spec.partition("=")
    data = json.loads(pathlib.Path(path).read_text())
    steps = data.get("step_time_s", {})
    if "none" not in steps:
        raise SystemExit(
            f"plot_step_split.py: error: {path} has no 'none' mode (run bench_train.py with "
            "--modes ...,none): without it there is no compute time to split off"
        )
    return label or pathlib.Path(path).stem, data


def main(argv=None) -> int:
    args = parse(argv)
    configs = [load(s) for s in args.results]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    modes = [
        m for m in ("ddl", "ddl-buckets", "lax") if any(m in d["step_time_s"] for _, d in configs)
    ]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(configs), 4.2))
    colors = {"ddl": "tab:blue", "ddl-buckets": "tab:green", "lax": "tab:gray"}
    for j, mode in enumerate(modes):
        xs, compute, exposed = [], [], []
        for i, (_, d) in enumerate(configs):
            if mode not in d["step_time_s"]:
                continue
            base = d["step_time_s"]["none"]
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            compute.append(base * 1e3)
            exposed.append((d["step_time_s"][mode] - base) * 1e3)
        ax.bar(xs, compute, width, color="lightsteelblue", edgecolor="white")
        ax.bar(xs, exposed, width, bottom=compute, color=colors[mode], label=f"{mode}: exposed")
        for x, c, e in zip(xs, compute, exposed):
            ax.annotate(f"{e:+.0f}", (x, c + max(e, 0)), ha="center", va="bottom", fontsize=7)
    handles, _ = ax.get_legend_handles_labels()
    compute_patch = Patch(color="lightsteelblue", label="compute (step without reduction)")
    ax.set_xticks(range(len(configs)), [label for label, _ in configs], fontsize=8)
    ax.set_ylabel("ms per step (median)")
    ax.set_title(args.title, fontsize=10)
    ax.legend(handles=[compute_patch, *handles], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
