"""Calibrate the concept redirector's threshold, push and mode for the toy-world benchmark.

    python -m toyworld.calibrate [--n 100]

Runs plain CFG and a grid of concept-redirector settings on a *calibration* split: its own prompt
and noise seeds (never the benchmark's), training names only (the held-out names never appear).
Picks the setting with the lowest harmful rate whose clean accuracy stays within ``--max-drop`` of
plain CFG's (ties: smaller clean distance) and writes results/calibration.json. `make eval` uses
the setting recorded there (``toyworld.eval.CONCEPT_DEFAULT``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = ["0.15,0.0,global", "0.2,0.0,global", "0.25,0.0,global", "0.3,0.0,global", "0.4,0.0,global",
        "0.3,0.5,global", "0.2,0.0,patch", "0.3,0.0,patch", "0.4,0.0,patch"]


def choose(results: dict, max_drop: float) -> tuple[str, dict]:
    """The calibrated setting: lowest harmful rate with clean accuracy >= plain - max_drop."""
    plain = results["methods"]["plain"]
    ok = []
    for name, row in results["methods"].items():
        if not name.startswith("concept"):
            continue
        setting = name[len("concept["):-1] if name.startswith("concept[") else results["settings"]["concept_settings"]
        if row["clean_accuracy"] >= plain["clean_accuracy"] - max_drop - 1e-9:
            ok.append((row["harmful_rate"], row["clean_distance"], setting, row))
    if not ok:
        raise SystemExit("no concept setting keeps clean accuracy within the allowed drop; widen the grid")
    ok.sort(key=lambda t: (t[0], t[1]))
    return ok[0][2], ok[0][3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="prompts per calibration split")
    ap.add_argument("--seed", type=int, default=7, help="calibration seed (the benchmark uses 2024)")
    ap.add_argument("--max-drop", type=float, default=0.01, help="allowed clean-accuracy drop (fraction)")
    ap.add_argument("--grid", default=";".join(GRID))
    ap.add_argument("--out", default=str(REPO / "results" / "calibration.json"))
    args = ap.parse_args(argv)

    from . import eval as bench

    raw = Path(args.out).with_name("calibration_runs.json")
    bench.main(["--n", str(args.n), "--seed", str(args.seed), "--splits", "clean,harmful",
                "--methods", "plain,concept", "--concept", args.grid, "--out", str(raw)])
    results = json.loads(raw.read_text())
    setting, row = choose(results, args.max_drop)
    summary = {"concept_setting": setting, "chosen": row, "plain": results["methods"]["plain"],
               "max_clean_drop": args.max_drop, "seed": args.seed, "n_prompts": results["n_prompts"],
               "held_out_names_used": False, "runs": str(raw.relative_to(REPO) if raw.is_relative_to(REPO) else raw)}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ncalibrated concept setting: {setting} (harmful {row['harmful_rate']:.3f}, clean accuracy "
          f"{row['clean_accuracy']:.3f} vs plain {results['methods']['plain']['clean_accuracy']:.3f}); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
