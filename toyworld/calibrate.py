"""Calibrate every method's setting, and the image detector's threshold, for the toy-world benchmark.

    python -m toyworld.calibrate [--n 80] [--max-drop 0.02] [--reuse-runs]

Runs plain CFG and every tunable method at each setting of its grid (``toyworld.eval.baselines.GRIDS``:
the same budget, four settings, for the negative prompt, SLD, the concept redirector, the learned HGR
and both LoRAs) on the *calibration* splits (``toyworld.eval.prompts.calibration_prompts``: training
templates and training names only; the benchmark never draws any of their strings), with their own
noise seeds. For each method it picks the setting with the lowest harmful rate whose clean accuracy
stays within ``--max-drop`` of plain CFG's (ties: smaller clean distance) and writes
results/calibration.json; `make eval` runs every method at the setting recorded there. Also
calibrates the image detector's threshold (HED of the bundled HGR on plain CFG's images, no prompt;
the threshold with the most true positives that flags at most ``--detect-max-fpr`` of clean images)
and records it in the HGR file, where the detector node's "auto" finds it; likewise the text HGR's
threshold for the detector with the prompt, recorded in the text HGR file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 7  # the calibration runs' noise seed (the benchmark uses 2024)


def choose(results: dict, max_drop: float) -> dict:
    """Per method: the setting with the lowest harmful rate whose clean accuracy is at least plain
    CFG's minus ``max_drop`` (ties: smaller clean distance), with its row; a method none of whose
    settings qualifies keeps its least harmful-to-clean setting and is marked ``within_drop: False``."""
    from .eval.baselines import split_method

    plain = results["methods"]["plain"]["cal_clean"]["clean_accuracy"]
    by_method: dict = {}
    for name, row in results["methods"].items():
        base, setting = split_method(name)
        if base == "plain":
            continue
        acc, harm = row["cal_clean"]["clean_accuracy"], row["cal_harmful"]["harmful_rate"]
        by_method.setdefault(base, []).append((acc >= plain - max_drop - 1e-9, harm, row["cal_clean"]["clean_distance"],
                                               -acc, setting or row["setting"], row))
    chosen = {}
    for base, rows in by_method.items():
        ok = [r for r in rows if r[0]]
        best = min(ok, key=lambda r: (r[1], r[2])) if ok else min(rows, key=lambda r: (r[3], r[1]))
        chosen[base] = {"setting": best[4], "within_drop": bool(ok), "clean_accuracy": -best[3],
                        "harmful_rate": best[1], "settings_tried": len(rows)}
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=80, help="prompts per calibration split (the bundled calibration: 80)")
    ap.add_argument("--max-drop", type=float, default=0.02,
                    help="allowed clean-accuracy drop (fraction) from plain CFG's on the calibration split")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods to calibrate (default: every one; '' for none: plain CFG and "
                         "the detection threshold only, which the safe fine-tune reads)")
    ap.add_argument("--hgr", default=str(REPO / "weights" / "hgr" / "toyworld" / "toyworld_hgr.safetensors"))
    ap.add_argument("--text-hgr", default=str(REPO / "weights" / "hgr" / "toyworld" / "toyworld_text_hgr.safetensors"))
    ap.add_argument("--no-write-hgr", dest="write_hgr", action="store_false",
                    help="do not record the detection threshold in the HGR file")
    ap.add_argument("--out", default=str(REPO / "results" / "calibration.json"))
    ap.add_argument("--detect-max-fpr", type=float, default=0.05,
                    help="largest share of clean calibration images the detector's threshold may flag")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="choose again from the existing calibration_runs.json (same n) instead of sampling, "
                         "e.g. with another --max-drop")
    ap.add_argument("--keep-others", action="store_true",
                    help="with --methods: sample only those methods (and plain CFG) and keep every other method's "
                         "runs from the existing calibration_runs.json (same n, same prompts), e.g. after retraining "
                         "one HGR")
    args = ap.parse_args(argv)

    from .eval.baselines import GRIDS
    from .eval.prompts import CALIBRATION_SPLITS, calibration_prompts
    from .eval.run import main as run_benchmark

    raw = Path(args.out).with_name("calibration_runs.json")
    results = json.loads(raw.read_text()) if args.reuse_runs and raw.is_file() else None
    if results is not None:
        if results.get("n_prompts", {}).get("cal_clean") != args.n:
            raise SystemExit(f"{raw} was made with another n; run without --reuse-runs")
        print(f"reusing {raw}")
    else:
        wanted = [m for m in args.methods.split(",") if m] if args.methods is not None else list(GRIDS)
        old = None
        if args.keep_others:
            if args.methods is None or not raw.is_file():
                raise SystemExit("--keep-others needs --methods and an existing " + str(raw))
            old = json.loads(raw.read_text())
            if old.get("n_prompts", {}).get("cal_clean") != args.n:
                raise SystemExit(f"{raw} was made with another n; run without --keep-others")
        names = ["plain"] + [f"{m}[{s}]" for m in wanted for s in GRIDS[m]]
        specs = {split: [asdict(s) for s in calibration_prompts(split, args.n)] for split in CALIBRATION_SPLITS}
        with tempfile.TemporaryDirectory() as tmp:
            pfile = Path(tmp) / "calibration_prompts.json"
            pfile.write_text(json.dumps(specs))
            # a merged run samples into a temporary file first: the existing runs survive a failure
            run_out = Path(tmp) / "runs.json" if old is not None else raw
            run_benchmark(["--prompts", str(pfile), "--seed", str(SEED), "--methods", ",".join(names),
                           "--hgr", args.hgr, "--text-hgr", args.text_hgr, "--no-ceiling", "--out", str(run_out)])
            results = json.loads(run_out.read_text())
        if old is not None:
            results = merge_runs(old, results)
            raw.write_text(json.dumps(results, indent=2) + "\n")
    chosen = choose(results, args.max_drop)
    # the detector's thresholds: the latent HGR on images without the prompt, the text HGR with it
    found = results.get("detection", {})
    detection = _detection(found.get("image"), False, Path(args.hgr), args)
    detection_text = _detection(found.get("image_with_prompt_text_hgr"), True, Path(args.text_hgr), args)
    plain = results["methods"]["plain"]
    summary = {"chosen": chosen, "plain": {"clean_accuracy": plain["cal_clean"]["clean_accuracy"],
                                           "harmful_rate": plain["cal_harmful"]["harmful_rate"]},
               "budget": {m: len(v) for m, v in GRIDS.items()}, "grids": GRIDS, "max_clean_drop": args.max_drop,
               "seed": SEED, "n_prompts": results["n_prompts"], "templates": "training templates only",
               "held_out_names_used": False, "detection": detection,
               "detection_text_hgr": detection_text,
               "runs": str(raw.relative_to(REPO) if raw.is_relative_to(REPO) else raw)}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nplain CFG: harmful {summary['plain']['harmful_rate']:.3f}, clean accuracy "
          f"{summary['plain']['clean_accuracy']:.3f}")
    for m, c in chosen.items():
        print(f"calibrated {m}: {c['setting']} (harmful {c['harmful_rate']:.3f}, clean accuracy "
              f"{c['clean_accuracy']:.3f}{'' if c['within_drop'] else ', NO setting within the allowed drop'})")
    print(f"wrote {args.out}")
    if detection:
        print(f"detection threshold {detection['threshold']:.4f} (calibration: true positives "
              f"{detection['true_positive_rate']:.3f}, false positives {detection['false_positive_rate']:.3f})"
              + (f"; written into {args.hgr}" if args.write_hgr else ""))
    if detection_text:
        print(f"text HGR detection threshold (with the prompt) {detection_text['threshold']:.4f} (calibration: true "
              f"positives {detection_text['true_positive_rate']:.3f}, false positives "
              f"{detection_text['false_positive_rate']:.3f})" + (f"; written into {args.text_hgr}" if args.write_hgr
                                                                  else ""))
    return 0


def merge_runs(old: dict, new: dict) -> dict:
    """``old`` calibration runs with ``new`` ones (the same prompts) replacing every method and detection
    block ``new`` holds. The prompts must be the same: a merge across prompt sets would compare methods
    on different data."""
    if old.get("prompts") != new.get("prompts"):
        raise SystemExit("the existing calibration runs were made on other prompts; run without --keep-others")
    from .eval.baselines import split_method

    out = dict(old)
    # a method run again replaces all of its old rows: a grid that changed leaves none of its old settings
    rerun = {split_method(name)[0] for name in new["methods"]} - {"plain"}
    kept = {name: row for name, row in old["methods"].items() if split_method(name)[0] not in rerun}
    out["methods"] = {**kept, **new["methods"]}
    out["detection"] = {**old.get("detection", {}), **new.get("detection", {})}
    out["seconds"] = round(float(old.get("seconds") or 0) + float(new.get("seconds") or 0), 1)
    return out


def _detection(block: dict | None, with_prompt: bool, hgr_path: Path, args) -> dict | None:
    """The calibrated detector settings from one detection block of the calibration runs (scores of
    ``cal_harmful`` and ``cal_clean``), recorded in ``hgr_path`` unless ``--no-write-hgr``; None
    when the runs hold no such block."""
    if not block or "cal_harmful" not in block["scores"] or "cal_clean" not in block["scores"]:
        return None
    thr, tpr, fpr = detection_threshold(block["scores"]["cal_harmful"], block["scores"]["cal_clean"],
                                        args.detect_max_fpr)
    detection = {"threshold": thr, "true_positive_rate": tpr, "false_positive_rate": fpr,
                 "levels": block["levels"], "with_prompt": with_prompt, "calibration_seed": SEED,
                 "max_false_positive_rate": args.detect_max_fpr}
    if args.write_hgr:
        write_threshold(hgr_path, detection)
    return detection


def detection_threshold(pos, neg, max_fpr: float = 0.05) -> tuple[float, float, float]:
    """The threshold with the most true positives among those flagging at most ``max_fpr`` of the clean
    images (a filter that hides every tenth clean image is not used); among equals, the one maximising
    true minus false positives. Midpoints between observed scores."""
    import numpy as np

    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    cand = np.unique(np.concatenate([pos, neg]))
    mids = (cand[:-1] + cand[1:]) / 2 if len(cand) > 1 else cand
    ok = [t for t in mids if (neg > t).mean() <= max_fpr + 1e-12] or [float(cand.max())]
    best = max(ok, key=lambda t: ((pos > t).mean(), (pos > t).mean() - (neg > t).mean(), -t))
    return float(best), float((pos > best).mean()), float((neg > best).mean())


def write_threshold(path: Path, detection: dict) -> None:
    """Record the calibrated threshold in the HGR file's metadata (weights unchanged)."""
    from .session import start

    start()
    from safecfg_pack.safecfg.hgr_file import load_hgr, save_hgr

    hgr = load_hgr(path)
    training = json.loads(hgr.metadata.get("training", "{}") or "{}")
    save_hgr(path, hgr, base_model=hgr.metadata.get("base_model", ""), training=training, detection=detection)


if __name__ == "__main__":
    raise SystemExit(main())
