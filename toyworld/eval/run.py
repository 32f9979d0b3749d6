"""`make eval` (``python -m toyworld.eval``): the toy-world benchmark of every safety method, in one run
with fixed seeds.

Splits (fixed seeds, ``--n`` prompts each): ``clean`` ("a red star on dots"), ``harmful`` (harmful
objects named with the names HGR training may see) and ``heldout`` (the held-out names only).
Methods, all sampled with the same noise through ComfyUI's own sampler (Euler, ``--steps`` steps,
cfg ``--cfg``): plain CFG, a negative prompt, SLD-style safe guidance (the SLD paper's update rule
with its "medium" hyper-parameters), the concept redirector (SafeCFG, training-free) and, where a
bundled HGR exists, the learned HGR and the fine-tuned LoRAs. The oracle scores every image.

Writes results/eval.json, results/eval_tradeoff.png, results/eval_samples.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..session import start
from . import metrics, report
from .baselines import CONCEPT_DEFAULT, CONCEPTS, SLD_MEDIUM, Methods
from .prompts import HARM_WORDS, SPLITS, make_prompts

REPO = Path(__file__).resolve().parents[2]


def encode_batch(clip, texts: list[str]):
    """One CONDITIONING holding every prompt of a split (each split is encoded once, for every method)."""
    import torch

    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts]
    return [[torch.cat(conds), {}]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="prompts per split (default 200)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--methods", default="plain,negative_prompt,sld,concept,hgr,finetuned_lora,supervised_lora")
    ap.add_argument("--splits", default="clean,harmful,heldout")
    ap.add_argument("--concept", default=CONCEPT_DEFAULT,
                    help="concept redirector threshold,push,mode[,start_percent[,push_threshold[,push_memory]]] "
                         "(default: the setting `python -m toyworld.calibrate` chose without held-out names, "
                         "results/calibration.json); several settings separated by ';' are each "
                         "run as a method `concept[threshold,push,mode]`")
    ap.add_argument("--hgr", default=str(REPO / "weights" / "hgr" / "toyworld_hgr.safetensors"),
                    help="the learned HGR evaluated as method 'hgr'")
    ap.add_argument("--detect-levels", type=int, default=4,
                    help="noise levels of the image detector on plain CFG's images (0 skips it)")
    ap.add_argument("--cpu", action="store_true", help="the CPU even where CUDA is available")
    ap.add_argument("--out", default=str(REPO / "results" / "eval.json"))
    args = ap.parse_args(argv)

    start(args.cpu)
    import comfy.sample
    import comfy.samplers
    import numpy as np
    import torch

    from safecfg_pack.nodes import detect_nodes

    from .. import world
    from ..models import load_clip, load_sd, load_unet, load_vae, weights_path
    from ..models_io import read_meta
    from ..oracle import Oracle, classify

    t_start = time.time()
    model, clip, vae = load_unet(), load_clip(), load_vae()
    oracle = Oracle()
    oracle.load_state_dict(load_sd(weights_path("oracle")))
    oracle.eval()
    splits = {name: make_prompts(name, args.n, args.seed + SPLITS.index(name)) for name in args.splits.split(",")}
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", args.steps)
    sampler = comfy.samplers.sampler_object("euler")

    def run(guider, n, seed):
        """Images (B, 64, 64, 3) and, for SafeCFG guiders, each sample's mean HED over the steps."""
        lat = torch.zeros(n, 4, 8, 8)
        noise = comfy.sample.prepare_noise(lat, seed)
        with torch.no_grad():
            out = guider.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=seed)
            imgs = vae.decode(out).float().clamp(0, 1)
        trace = getattr(guider, "hed_trace", None)
        hed = torch.stack([e.float() for _, e in trace]).mean(0) if trace else None
        return imgs, hed

    methods = Methods(model, clip, methods=args.methods, concept=args.concept, hgr_path=Path(args.hgr),
                      steps=args.steps, cfg=args.cfg, negative_prompt=HARM_WORDS)
    results: dict = {"methods": {}, "n_prompts": {k: len(v) for k, v in splits.items()},
                     "settings": {"steps": args.steps, "cfg": args.cfg, "sampler": "euler", "scheduler": "normal",
                                  "seed": args.seed, "negative_prompt": HARM_WORDS, "sld": SLD_MEDIUM,
                                  "concepts": CONCEPTS, "concept_settings": args.concept,
                                  "held_out_names": world.HELD_OUT_NAMES}}
    images: dict = {}
    heds: dict = {}
    # real generator images for the clean prompts (Frechet distance reference)
    rng = np.random.default_rng(args.seed + 99)
    real_feat = None
    if "clean" in splits:
        real = np.stack([world.render(world.prompt_scene(c, col, c, bg, rng), rng)
                         for _, c, col, bg in splits["clean"]])
        real_out = classify(oracle, torch.from_numpy(real))
        real_feat = real_out["features"].numpy()
        with torch.no_grad():
            recon = vae.decode(vae.encode(torch.from_numpy(real))).float().clamp(0, 1)
        rec_out = classify(oracle, recon)

        def acc(out):
            return float(np.mean(metrics.requested(out, splits["clean"])[2]))

        # how well the oracle reads the requested attributes on real generator images, and on the same
        # images after a VAE round trip (the ceiling for any generated image)
        results["oracle"] = {"clean_accuracy_real": acc(real_out), "clean_accuracy_vae_roundtrip": acc(rec_out),
                             "metadata": read_meta(weights_path("oracle"))}
        print(f"[eval] oracle on real clean images {acc(real_out):.3f}, after VAE round trip {acc(rec_out):.3f}")
    # each split's prompts are encoded once and shared by every method
    split_conds = {split: encode_batch(clip, [p[0] for p in prompts]) for split, prompts in splits.items()}
    for method in methods.names:
        t0 = time.time()
        row = {}
        for k, (split, prompts) in enumerate(splits.items()):
            imgs, hed = run(methods.guider(method, split_conds[split]), len(prompts), args.seed * 31 + k)
            images[(method, split)] = imgs
            if hed is not None:
                heds[(method, split)] = hed
            out = classify(oracle, imgs)
            if split == "clean":
                row.update(metrics.clean_row(out, prompts, real_feat, imgs, images.get(("plain", "clean"))))
            else:
                row.update(metrics.harmful_row(out, prompts, split))
        row["seconds"] = round(time.time() - t0, 1)
        results["methods"][method] = row
        print(report.line(method, row), flush=True)

    # detection: the HED of the sampling run (mean over steps) as a harmfulness score, harmful vs clean
    det = {}
    for method in methods.names:
        if (method, "clean") not in heds:
            continue
        d = {}
        for split, key in (("harmful", "auroc_sampling"), ("heldout", "auroc_sampling_heldout")):
            if (method, split) in heds:
                d[key] = metrics.auroc(heds[(method, split)].numpy(), heds[(method, "clean")].numpy())
        d["mean_hed_clean"] = float(heds[(method, "clean")].mean())
        for split in ("harmful", "heldout"):
            if (method, split) in heds:
                d[f"mean_hed_{split}"] = float(heds[(method, split)].mean())
        det[method] = d
        print(f"[eval] detection ({method}): " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()), flush=True)
    if det:
        results["detection"] = {"sampling": det}
        if "hgr" in det:
            results["detection"].update({k: v for k, v in det["hgr"].items() if k.startswith("auroc")})

    # detection on finished images, without the prompt (HGRHarmDetector's code path): plain CFG's images
    hgr_handle = methods.hgr
    if hgr_handle is not None and args.detect_levels > 0 and "plain" in methods.names:
        t0 = time.time()
        scores = {}
        for split in splits:
            d = detect_nodes.run_detection(images[("plain", split)], model, clip, vae, hgr_handle, None, 1.0,
                                           args.detect_levels, 0, 50)
            scores[split] = d.scores.numpy()
        thr = hgr_handle.redirector.detect_threshold
        img = {"levels": args.detect_levels, "seconds": round(time.time() - t0, 1),
               "scores": {k: [round(float(x), 6) for x in v] for k, v in scores.items()}}
        if "clean" in scores:
            if "harmful" in scores:
                img["auroc_image"] = metrics.auroc(scores["harmful"], scores["clean"])
            if "heldout" in scores:
                img["auroc_image_heldout"] = metrics.auroc(scores["heldout"], scores["clean"])
        if thr is not None:
            img["threshold"] = thr
            for split, v in scores.items():
                img[f"flagged_rate_{split}"] = float(np.mean(v > thr))
        results.setdefault("detection", {})
        results["detection"]["image"] = img
        results["detection"].update({k: v for k, v in img.items() if k.startswith("auroc") or k == "threshold"})
        print("[eval] detection on images (no prompt): " + ", ".join(
            f"{k} {v:.3f}" for k, v in img.items() if isinstance(v, float)), flush=True)

    print()
    print(report.table(results))
    results["seconds"] = round(time.time() - t_start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if set(splits) == set(SPLITS):
        report.plot(results, out.with_name(out.stem + "_tradeoff.png"))
        report.grid(images, splits, out.with_name(out.stem + "_samples.png"))
    print(f"\nwrote {out} (and its _tradeoff.png, _samples.png) in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
