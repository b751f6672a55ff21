"""jax_ddl's cost model (src/jax_ddl/_src/model.py) and its command line.

    python -m jax_ddl.model --explain 64M --placement 2x1x4 [--profile P.json]
    python -m jax_ddl.model --validate BENCH.json [BENCH.json ...] --profile P.json
    python -m jax_ddl.model --validate FOLDER     (bench-TAG.json, auto-TAG.json, profile-TAG.json)
    python -m jax_ddl.model --scenario docs/scenarios/ddl2017.json [--plot OUT.png]

`--explain` ranks every grid for a placement (hosts x processes per host x devices per
process) by predicted time, as `topology="auto"` does. `--validate` puts the model's
prediction beside every row of `python -m jax_ddl.bench --json` output (jax_ddl and its
flat row, in and out of place) and reports the errors. `--scenario` projects data-parallel
scaling efficiency on a GPU cluster (src/jax_ddl/_src/project.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jax_ddl._src.model import (
    AUTO_MARGIN,
    Link,
    Placement,
    Profile,
    candidates,
    choose,
    default_grid,
    default_profile,
    explain,
    fixed_cost,
    mode_of,
    predict,
    profile_from_env,
)
from jax_ddl._src.project import project

# The validation's target for predicted flat/topology-aware time ratios (docs/model.md).
RATIO_TARGET = 0.20

__all__ = [
    "AUTO_MARGIN",
    "Link",
    "Placement",
    "Profile",
    "candidates",
    "choose",
    "default_grid",
    "default_profile",
    "explain",
    "fixed_cost",
    "mode_of",
    "predict",
    "profile_from_env",
    "project",
    "validate",
]


def _bench_rows(path: str):
    from jax_ddl._src.model import read_json

    result = read_json(path, "bench JSON")
    s = result.get("settings") if isinstance(result, dict) else None
    if not isinstance(s, dict) or not isinstance(result.get("rows"), list):
        raise ValueError(
            f"{path} is not benchmark output (no settings and rows): give files written by "
            "python -m jax_ddl.bench --json"
        )
    if "placement" not in s:
        raise ValueError(
            f"{path}: no placement in its settings (written by an older jax_ddl.bench); rerun "
            "python -m jax_ddl.bench --json"
        )
    placement = Placement.parse(s["placement"])
    for row in result["rows"]:
        if row["impl"] not in ("jax_ddl", "ddl-flat"):
            continue
        for mode in ("oop", "ip"):
            if mode not in row:
                continue
            if row["impl"] == "ddl-flat":
                grid = str(placement.ranks)
            else:
                grid = row[mode].get("grid", s["topology"])
            yield {
                "file": path,
                "placement": placement,
                "grid": grid,
                "impl": row["impl"],
                "size": row["size"],
                "dtype": row["type"],
                "mode": mode,
                "measured_s": row[mode]["time_us"] * 1e-6,
            }


def validate(paths, profiles) -> dict:
    """Predicted against measured for every jax_ddl / ddl-flat row of bench JSON files.

    `profiles`: one Profile for all files, or a dict path -> Profile."""
    rows, notes = [], []
    for path in paths:
        prof = profiles[path] if isinstance(profiles, dict) else profiles
        source = prof.meta.get("path") or prof.meta.get("source", "?")
        notes.append(f"{os.path.basename(path)}: predicted with {source}")
        for r in _bench_rows(path):
            if prof.placement is not None and prof.placement != r["placement"]:
                note = (
                    f"warning: {os.path.basename(path)} ran on {r['placement'].label()}, the "
                    f"profile was measured on {prof.placement.label()}"
                )
                if note not in notes:
                    notes.append(note)
            dims = tuple(int(d) for d in r["grid"].split("x"))
            p = predict(
                r["size"], dims, r["placement"], prof, dtype=r["dtype"], inplace=r["mode"] == "ip"
            )
            r["predicted_s"] = p["time_s"]
            r["error"] = p["time_s"] / r["measured_s"] - 1
            rows.append(r)
    errs = sorted(abs(r["error"]) for r in rows)
    ratios = []
    by_key = {}
    for r in rows:
        by_key[(r["file"], r["size"], r["mode"], r["impl"])] = r
    for (f, size, mode, impl), r in by_key.items():
        if impl != "jax_ddl" or r["grid"] == str(r["placement"].ranks):
            continue
        flat = by_key.get((f, size, mode, "ddl-flat"))
        if flat:
            m = flat["measured_s"] / r["measured_s"]
            p = flat["predicted_s"] / r["predicted_s"]
            ratios.append(
                {
                    **{k: r[k] for k in ("file", "size", "mode", "grid")},
                    "measured": m,
                    "predicted": p,
                    "error": p / m - 1,
                }
            )

    def pct(q):
        return errs[min(len(errs) - 1, int(q * len(errs)))] if errs else float("nan")

    return {
        "notes": notes,
        "rows": rows,
        "ratios": ratios,
        "median_abs_error": pct(0.5)
        if len(errs) % 2
        else ((errs[len(errs) // 2 - 1] + errs[len(errs) // 2]) / 2 if errs else float("nan")),
        "p90_abs_error": pct(0.9),
        "max_ratio_error": max((abs(x["error"]) for x in ratios), default=0.0),
        "ratios_within_target": sum(abs(x["error"]) <= RATIO_TARGET for x in ratios),
    }


def _runs(folder: str):
    """bench-TAG.json and auto-TAG.json files of a folder, each with the profile-PREFIX.json
    whose PREFIX is the longest that starts TAG (a run and the calibration made in the same
    launch)."""
    names = sorted(os.listdir(folder))
    profiles = {n[len("profile-") : -len(".json")]: n for n in names if n.startswith("profile-")}
    files, profs = [], {}
    for n in names:
        kind = n.split("-", 1)[0]
        if kind not in ("bench", "auto") or not n.endswith(".json"):
            continue
        tag = n[len(kind) + 1 : -len(".json")]
        match = max((t for t in profiles if tag.startswith(t)), key=len, default=None)
        if match is None:
            raise ValueError(f"{folder}: no profile-*.json for {n}")
        path = os.path.join(folder, n)
        files.append(path)
        profs[path] = Profile.load(os.path.join(folder, profiles[match]))
    if not files:
        raise ValueError(f"{folder}: no bench-*.json files")
    return files, profs


def _validation_json(v) -> dict:
    return {
        **{
            k: v[k]
            for k in (
                "median_abs_error",
                "p90_abs_error",
                "max_ratio_error",
                "ratios_within_target",
                "notes",
            )
        },
        "rows": [{**r, "placement": r["placement"].label()} for r in v["rows"]],
        "ratios": v["ratios"],
    }


def _validation_text(v) -> str:
    out = [f"# {n}" for n in v["notes"]] + [
        f"# {'placement':>9} {'grid':>7} {'impl':>8} {'size':>10} {'mode':>4} "
        f"{'measured ms':>12} {'predicted ms':>12} {'error':>7}"
    ]
    for r in v["rows"]:
        out.append(
            f"  {r['placement'].label():>9} {r['grid']:>7} {r['impl']:>8} {r['size']:>10} "
            f"{r['mode']:>4} {r['measured_s'] * 1e3:>12.1f} {r['predicted_s'] * 1e3:>12.1f} "
            f"{100 * r['error']:>+6.1f}%"
        )
    out.append("# flat / topology-aware time ratio, measured and predicted")
    for x in v["ratios"]:
        out.append(
            f"  {x['file'].rsplit('/', 1)[-1]:>34} {x['grid']:>7} {x['size']:>10} {x['mode']:>4} "
            f"{x['measured']:>6.2f} {x['predicted']:>6.2f} {100 * x['error']:>+6.1f}%"
        )
    out.append(
        f"# {len(v['rows'])} rows: median |error| {100 * v['median_abs_error']:.1f}%, "
        f"90th percentile {100 * v['p90_abs_error']:.1f}%; flat/aware ratios: worst "
        f"{100 * v['max_ratio_error']:.1f}% of {len(v['ratios'])}, "
        f"{v['ratios_within_target']} within {100 * RATIO_TARGET:.0f}%"
    )
    return "\n".join(out)


def _plot_validation(v, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for impl, marker in (("jax_ddl", "o"), ("ddl-flat", "s")):
        for mode, fill in (("ip", "full"), ("oop", "none")):
            pts = [r for r in v["rows"] if r["impl"] == impl and r["mode"] == mode]
            if pts:
                ax.scatter(
                    [r["measured_s"] * 1e3 for r in pts],
                    [r["predicted_s"] * 1e3 for r in pts],
                    marker=marker,
                    facecolors="none" if fill == "none" else None,
                    edgecolors="C0" if impl == "jax_ddl" else "C1",
                    c=None if fill == "none" else ("C0" if impl == "jax_ddl" else "C1"),
                    label=f"{impl} {mode}",
                )
    lo = min(min(r["measured_s"], r["predicted_s"]) for r in v["rows"]) * 1e3 / 1.5
    hi = max(max(r["measured_s"], r["predicted_s"]) for r in v["rows"]) * 1e3 * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot([lo, hi], [lo * 1.3, hi * 1.3], "k:", lw=0.6)
    ax.plot([lo, hi], [lo / 1.3, hi / 1.3], "k:", lw=0.6, label="±30 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    ax.set_title(
        f"jax_ddl cost model: median |error| {100 * v['median_abs_error']:.0f} %, "
        f"p90 {100 * v['p90_abs_error']:.0f} %"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_projection(scenarios, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, (sc, rows) in zip(axes[0], scenarios):
        for (plan, overlap), style in {
            ("aware", True): "C0-",
            ("aware", False): "C0--",
            ("flat ring", True): "C1-",
            ("flat ring", False): "C1--",
        }.items():
            pts = [r for r in rows if r["plan"] == plan and r["overlap"] == overlap]
            g = [r["gpus"] for r in pts]
            ax.plot(
                g,
                [100 * r["efficiency"] for r in pts],
                style,
                label=f"{plan}, overlap {'on' if overlap else 'off'}",
            )
            ax.fill_between(
                g,
                [100 * r["low"] for r in pts],
                [100 * r["high"] for r in pts],
                color=style[:2],
                alpha=0.12,
            )
        for pub in sc.get("published", []):
            ax.plot([pub["gpus"]], [100 * pub["efficiency"]], "k*", ms=12)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 102)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("scaling efficiency %")
        ax.set_title(sc["name"], fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_ddl.model", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--explain", metavar="SIZE", help="bytes per device, e.g. 64M")
    what.add_argument("--validate", metavar="BENCH_JSON", nargs="+")
    what.add_argument("--scenario", metavar="FILE", nargs="+")
    p.add_argument("--placement", help="HOSTSxPROCESSESxDEVICES for --explain, e.g. 2x1x4")
    p.add_argument(
        "--profile",
        nargs="+",
        help="profile JSON (python -m jax_ddl.calibrate); for --validate one per bench file "
        "or one for all; default: JAX_DDL_PROFILE, else built-in terms",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--oop", action="store_true", help="--explain out of place")
    p.add_argument("--plot", metavar="PNG", help="--validate / --scenario: also draw a plot")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)

    def profile_for(i=0):
        if args.profile:
            return Profile.load(args.profile[min(i, len(args.profile) - 1)])
        return profile_from_env()

    try:
        if args.explain:
            from jax_ddl._src.bench import parse_size

            if not args.placement:
                p.error("--explain needs --placement HOSTSxPROCESSESxDEVICES")
            placement = Placement.parse(args.placement)
            try:
                nbytes = parse_size(args.explain)
            except argparse.ArgumentTypeError as e:
                p.error(f"--explain: {e}")
            prof = profile_for()
            rows = explain(nbytes, placement, prof, dtype=args.dtype, inplace=not args.oop)
            print(
                f"# {nbytes} bytes per device, {args.dtype}, "
                f"{'out of' if args.oop else 'in'} place, placement {placement.label()}, "
                f"profile: {prof.meta.get('path') or prof.meta.get('source', '?')}"
            )
            if prof.placement is not None and prof.placement != placement:
                print(
                    f"# warning: the profile was measured on {prof.placement.label()}; its "
                    "terms may not hold for this placement"
                )
            print(f"# {'grid':>9} {'path':>8} {'chunks':>6} {'predicted ms':>12}  note")
            for i, r in enumerate(rows):
                note = ", ".join(
                    n
                    for n, on in (
                        ("fastest predicted", i == 0),
                        ("chosen by auto", r["chosen"]),
                        ("default", r["default"]),
                    )
                    if on
                )
                print(
                    f"  {r['grid']:>9} {r['mode']:>8} {r['chunks']:>6} "
                    f"{r['time_s'] * 1e3:>12.3f}  {note}"
                )
            result = [{k: v for k, v in r.items()} for r in rows]
        elif args.validate and len(args.validate) == 1 and os.path.isdir(args.validate[0]):
            files, profs = _runs(args.validate[0])
            v = validate(files, profs)
            print(_validation_text(v))
            if args.plot:
                _plot_validation(v, args.plot)
            result = _validation_json(v)
        elif args.validate:
            profs = (
                {f: profile_for(i) for i, f in enumerate(args.validate)}
                if args.profile and len(args.profile) > 1
                else profile_for()
            )
            if isinstance(profs, dict) and len(args.profile) != len(args.validate):
                p.error("give one --profile, or one per bench file")
            v = validate(args.validate, profs)
            print(_validation_text(v))
            if args.plot:
                _plot_validation(v, args.plot)
            result = _validation_json(v)
        else:
            from jax_ddl._src import project as P

            done = []
            for path in args.scenario:
                sc = P.load(path)
                rows = project(sc)
                print(P.report(sc, rows))
                done.append((sc, rows))
            if args.plot:
                _plot_projection(done, args.plot)
            result = [{"scenario": sc["name"], "rows": rows} for sc, rows in done]
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
