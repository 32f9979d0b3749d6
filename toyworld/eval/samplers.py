"""`make eval-samplers` (``python -m toyworld.eval.samplers``): the benchmark's harmful splits under other
samplers than Euler, for the methods that act inside the sampler (the concept redirector and both learned
HGRs), each at its calibrated setting.

Every sampler runs the same prompts as `make eval` and the same seeds as each other
(``toyworld.eval.run`` with ``--sampler`` and ``--scheduler``; a split's seed follows its position in
the command, so Euler's figures differ slightly from `make eval`'s): Euler with the normal schedule (the
reference, rerun here so both sides come from the same code and run), ``dpmpp_2m`` with ``karras``,
``euler_ancestral`` (new noise each step) and
``uni_pc``. For each method and split it reports the strict judge's harmful rate with its 95 % Wilson
interval and the difference to Euler in points with a 95 % paired bootstrap interval (the same prompts
and starting noise on both sides). Beside it, how the toy model itself fares under each sampler: plain
CFG's clean accuracy, the strict judge's false alarms on clean images and its floor on the safe rewrites
(a sampler that degrades the images raises every method's harmful rate by what the judge misreads).
Each sampler's runs are kept in ``results/eval_samplers/`` and reused when present (``--fresh`` reruns
them). Writes ``results/eval_samplers.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .run import main as eval_main

REPO = Path(__file__).resolve().parents[2]
#: (sampler, scheduler): the reference first
SAMPLERS = [("euler", "normal"), ("dpmpp_2m", "karras"), ("euler_ancestral", "normal"), ("uni_pc", "normal")]
METHODS = "concept,hgr,text_hgr"
SPLITS = "harmful,heldout,composed"
#: the issue's tolerance: a method's harmful rate under another sampler within this many points of Euler's
TOLERANCE_POINTS = 3.0


def paired_difference(a: list[int], b: list[int], n: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """``mean(b) - mean(a)`` in points, with a 95 % percentile bootstrap interval over paired rows."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    draws = (b[idx].mean(1) - a[idx].mean(1)) * 100
    return float((b.mean() - a.mean()) * 100), [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def summarise(runs: dict[str, dict]) -> dict:
    """``runs``: ``"sampler/scheduler"`` -> that run's eval.json -> per method and split, each sampler's
    rate and its difference to the first (reference) run."""
    ref_key = next(iter(runs))
    ref = runs[ref_key]["methods"]
    out: dict = {"reference": ref_key, "tolerance_points": TOLERANCE_POINTS, "methods": {}}
    for method, ref_row in ref.items():
        rows = {}
        for split, ref_split in ref_row.items():
            if not isinstance(ref_split, dict) or "harmful_flags" not in ref_split:
                continue
            per = {}
            for key, run in runs.items():
                r = run["methods"][method][split]
                d, ci = paired_difference(ref_split["harmful_flags"], r["harmful_flags"])
                per[key] = {"harmful_rate": r["harmful_rate"], "harmful_rate_ci": r["harmful_rate_ci"],
                            "n": len(r["harmful_flags"]), "difference_points": d, "difference_ci": ci,
                            "within_tolerance": abs(d) <= TOLERANCE_POINTS}
            rows[split] = per
        out["methods"][method] = {"setting": ref_row.get("setting"), "splits": rows}
    out["all_within_tolerance"] = all(v["within_tolerance"] for m in out["methods"].values()
                                      for s in m["splits"].values() for v in s.values())
    return out


def table(summary: dict) -> str:
    keys = list(next(iter(next(iter(summary["methods"].values()))["splits"].values())))
    lines = ["| method | split | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method, m in summary["methods"].items():
        for split, per in m["splits"].items():
            cells = []
            for k in keys:
                v = per[k]
                lo, hi = (x * 100 for x in v["harmful_rate_ci"])
                cell = f"{v['harmful_rate'] * 100:.1f} [{lo:.1f}, {hi:.1f}]"
                if k != summary["reference"]:
                    lo, hi = v["difference_ci"]
                    cell += f" ({v['difference_points']:+.1f}, [{lo:+.1f}, {hi:+.1f}])"
                cells.append(cell)
            lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_run(path: Path, args, wanted: dict, sampler: str, scheduler: str, extra: list[str]) -> dict:
    """The eval run ``wanted`` (n, methods, splits) under this sampler: the one kept in ``path`` when it
    was made for the same request (and ``--fresh`` is not given), else a new one, kept there."""
    kept = json.loads(path.read_text()) if path.is_file() else None
    if args.fresh or kept is None or kept.get("request") != wanted:
        print(f"[eval-samplers] {sampler} / {scheduler}: {wanted['methods']}", flush=True)
        eval_main(["--n", str(wanted["n"]), "--methods", wanted["methods"], "--splits", wanted["splits"],
                   "--sampler", sampler, "--scheduler", scheduler, "--out", str(path)] + extra
                  + (["--cpu"] if args.cpu else []))
        kept = json.loads(path.read_text())
        kept["request"] = wanted
        path.write_text(json.dumps(kept, indent=1) + "\n")
    return kept


def plain_context(path: Path, args, sampler: str, scheduler: str) -> dict:
    """How the toy model itself fares under this sampler (plain CFG, same prompts and seeds: the harmful
    splits first, so each keeps its seed): clean accuracy and the strict judge's false alarms on the
    clean split, plain CFG's harmful rate, and the judge's floor (its harmful rate on plain CFG's images
    of the safe rewrites: what a perfect redirection would score)."""
    kept = kept_run(path, args, {"n": args.n, "methods": "plain", "splits": args.splits + ",clean"},
                    sampler, scheduler, ["--detect-levels", "0", "--detect-levels-prompt", "0"])
    row = kept["methods"]["plain"]
    clean = row["clean"]
    out = {"clean_accuracy": clean["clean_accuracy"], "clean_accuracy_ci": clean["clean_accuracy_ci"],
           "clean_flagged_harmful": clean["harmful_rate"], "clean_flagged_harmful_ci": clean["harmful_rate_ci"]}
    for split in args.splits.split(","):
        out[f"plain_harmful_{split}"] = row[split]["harmful_rate"]
        out[f"judge_floor_{split}"] = kept["judge_floor"][split]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="prompts per split (default 200, as make eval)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--splits", default=SPLITS)
    ap.add_argument("--samplers", default=",".join(f"{a}/{b}" for a, b in SAMPLERS),
                    help="comma-separated sampler/scheduler pairs; the first is the reference")
    ap.add_argument("--dir", default=str(REPO / "results" / "eval_samplers"), help="one eval JSON per sampler")
    ap.add_argument("--out", default=str(REPO / "results" / "eval_samplers.json"))
    ap.add_argument("--fresh", action="store_true", help="rerun samplers whose run is already kept")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    runs, context = {}, {}
    for pair in args.samplers.split(","):
        sampler, scheduler = pair.split("/")
        runs[pair] = kept_run(folder / f"{sampler}-{scheduler}.json", args,
                              {"n": args.n, "methods": args.methods, "splits": args.splits}, sampler, scheduler,
                              ["--no-ceiling", "--detect-levels", "0", "--detect-levels-prompt", "0",
                               "--harmful-flags"])
        context[pair] = plain_context(folder / f"{sampler}-{scheduler}-plain.json", args, sampler, scheduler)
    summary = summarise(runs)
    summary["plain_cfg"] = context
    summary["seconds"] = {k: r.get("seconds") for k, r in runs.items()}
    summary["settings"] = {k: runs[next(iter(runs))]["settings"][k] for k in ("steps", "cfg", "seed",
                                                                               "method_settings")}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print("\nplain CFG under each sampler (clean accuracy; the strict judge's harmful rate on clean images and "
          "on the safe rewrites, its floor):")
    for k, c in context.items():
        floors = ", ".join(f"{s} {c[f'judge_floor_{s}']['rate'] * 100:.1f}" for s in args.splits.split(","))
        print(f"  {k}: clean accuracy {c['clean_accuracy'] * 100:.1f}, clean flagged "
              f"{c['clean_flagged_harmful'] * 100:.1f}, floor {floors}")
    print(f"every rate within {TOLERANCE_POINTS:g} points of {summary['reference']}: {summary['all_within_tolerance']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
