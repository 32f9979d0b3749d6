"""``python -m commands.safe_finetune --toy --out lora.safetensors [--supervised]`` (or ``--checkpoint``):
unsupervised safe fine-tuning, a LoRA scored by the HGR's harmful Euclidean distance, from a
repository checkout (ComfyUI from the bootstrap or ``COMFYUI_DIR``). Resumable: rerun the same
command after an interruption. ``--supervised`` trains the ESD-style baseline from the true labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_device_args, add_model_args, check_model_args, load_model, progress_bars, start


def main(argv=None, models=None) -> int:
    """The command line; ``models``: a (MODEL, CLIP, base model name) triple that a host which runs
    ComfyUI in this process has loaded itself, in place of a model option."""
    ap = argparse.ArgumentParser(description="Unsupervised safe fine-tuning: an HED-scored LoRA.")
    add_model_args(ap)
    ap.add_argument("--hgr", default=None, help="learned HGR file, latent or text (default for --toy: the bundled toy "
                                                "text HGR, the default learned HGR)")
    ap.add_argument("--strength", type=float, default=None,
                    help="how far the targets redirect, as the guider's strength (default: the strength calibrated "
                         "for the HGR in results/calibration.json for --toy, else 1.0)")
    ap.add_argument("--prompts", default=None,
                    help="unlabelled prompt pool (.txt, one per line, or .json; only prompt strings are read; "
                         "default for --toy: data/toyworld_pool.txt)")
    ap.add_argument("--supervised", action="store_true",
                    help="the ESD-style baseline that uses the true labels instead of the HGR")
    ap.add_argument("--labels", default=None,
                    help="--supervised only: the labels, {\"harmful\": {prompt: true/false}} or an HGR pair file "
                         "(default for --toy: data/toyworld_pool_labels.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--states", type=int, default=5, help="states per trajectory")
    ap.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts of the (shuffled) pool")
    ap.add_argument("--uncond-weight", type=float, default=1.0,
                    help="weight of the empty prompt's preservation term (0: the empty prompt is not trained, as "
                         "before this option)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", default=None, help="resumable state folder (default: .toytrain/<out>.state for "
                                                  "--toy, else next to --out)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    check_model_args(ap, args, loaded=models is not None)

    repo = start(args)
    from safecfg_pack.nodes.finetune_nodes import run_finetune, unlabeled_prompts
    from safecfg_pack.safecfg.finetune import FinetuneSpec
    from safecfg_pack.safecfg.hgr_file import load_hgr
    from safecfg_pack.safecfg.prompts import PromptData

    if not args.toy and (not args.prompts or (not args.hgr and not args.supervised)):
        raise SystemExit("--prompts and --hgr (or --supervised with --labels) are required for a model other "
                         "than --toy")
    mp, clip, base = models if models is not None else load_model(args)
    if args.toy:
        pool_path = Path(args.prompts or repo / "data" / "toyworld_pool.txt")
        labels_path = Path(args.labels or repo / "data" / "toyworld_pool_labels.json")
        hgr_path = args.hgr or repo / "weights" / "hgr" / "toyworld" / "toyworld_text_hgr.safetensors"
    else:
        pool_path, hgr_path = Path(args.prompts), args.hgr
        labels_path = Path(args.labels) if args.labels else pool_path
    prompts = unlabeled_prompts(pool_path)
    if args.max_prompts:
        prompts = prompts[:args.max_prompts]
    hgr = None
    labels = None
    if args.supervised:  # the baseline reads the labels
        raw = json.loads(labels_path.read_text(encoding="utf-8"))
        if "pairs" in raw:
            harmful = set(PromptData.load(labels_path).harmful)
            labels = [p in harmful for p in prompts]
        else:
            missing = [p for p in prompts if p not in raw["harmful"]]
            if missing:
                raise SystemExit(f"{labels_path}: no label for {len(missing)} prompts, e.g. {missing[0]!r}")
            labels = [bool(raw["harmful"][p]) for p in prompts]
    else:
        hgr = load_hgr(hgr_path)
    strength = args.strength
    if strength is None:
        strength = 1.0
        if args.toy and hgr is not None:  # the strength `make calibrate` chose for the toy HGR (else its default)
            from toyworld.eval.baselines import calibrated_settings

            strength = float(calibrated_settings()["text_hgr" if getattr(hgr, "kind", "") == "text" else "hgr"])
    spec = FinetuneSpec(rank=args.rank, steps=args.steps, states_per_trajectory=args.states, seed=args.seed,
                        uncond_weight=args.uncond_weight,
                        threshold=(hgr.detect_threshold or 0.5) if hgr is not None else 0.5, hgr_strength=strength)
    summary = run_finetune(mp, clip, prompts, Path(args.out), spec, redirector=hgr, harmful_labels=labels,
                           image_size=args.size, progress=progress_bars(),
                           state_dir=Path(args.state) if args.state else (
                               repo / ".toytrain" / (Path(args.out).stem + ".state") if args.toy else None),
                           metadata={"base_model": base})
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
