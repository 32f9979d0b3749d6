"""`make eval` (``python -m toyworld.eval``): the toy-world benchmark of every safety method, in one run
with fixed seeds.

Splits (``toyworld.eval.prompts``, ``--n`` prompts each, none of them a string that any training,
fine-tuning or calibration data holds): ``clean`` and ``composed_clean`` (one or two clean objects),
``harmful`` (training names in held-out templates), ``heldout`` (held-out names) and ``composed`` (a
harmful object beside a clean one). Methods, all sampled with the same noise through ComfyUI's own
sampler (Euler and the normal schedule unless ``--sampler``/``--scheduler`` say otherwise; ``--steps``
steps, cfg ``--cfg``), each at the setting `make calibrate` chose on the calibration split with the
same budget for every method (results/calibration.json): plain CFG, a negative prompt, SLD, the concept
redirector (SafeCFG, training-free), both learned HGRs (latent and the paper's text form) and the
fine-tuned LoRAs. The strict oracle judges every image; the lenient
one's harmful rate is reported beside it. Plain CFG also draws every harmful single prompt's safe
rewrite at the same seeds: the ceiling of the redirect fidelity. Detection: the sampling HED, the
latent HGR on finished images without the prompt, the text HGR's distance on the prompt alone and on
finished images with the prompt.

Writes results/eval.json, results/eval_tradeoff.png, results/eval_samples.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..session import start
from . import metrics, report
from .baselines import CONCEPTS, GRIDS, Methods, calibrated_settings, split_methods
from .prompts import CLEAN_SPLITS, HARM_WORDS, SPLITS, make_prompts, training_strings

REPO = Path(__file__).resolve().parents[2]
METHODS = "plain,negative_prompt,sld,concept,hgr,text_hgr,finetuned_lora,supervised_lora"
TEXT_HGR = REPO / "weights" / "hgr" / "toyworld" / "toyworld_text_hgr.safetensors"


def encode_batch(clip, texts: list[str]):
    """One CONDITIONING holding every prompt of a split (each split is encoded once, for every method)."""
    import torch

    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts]
    return [[torch.cat(conds), {}]]


def real_scene(spec, rng):
    """The generator scene a prompt asks for (the Frechet distance's reference): one object in the
    centre, or two side by side, in the requested colours and sizes; a random background when none is
    asked for."""
    from .. import world

    n = len(spec.items)
    objs = []
    for j, it in enumerate(spec.items):
        size = world.SIZES[it.size or ("large" if rng.uniform() < 0.5 else "small")] * (0.85 if n == 2 else 1.0)
        colour = it.colour or world.COLOUR_NAMES[rng.integers(len(world.COLOUR_NAMES))]
        x = 0.5 if n == 1 else (0.3, 0.7)[j]
        objs.append(world.Obj(it.cls, colour, x, 0.5, size, it.name))
    return world.Scene(objs, spec.background or world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="prompts per split (default 200)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--sampler", default="euler", help="ComfyUI sampler name (default euler)")
    ap.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name (default normal)")
    ap.add_argument("--methods", default=METHODS,
                    help="comma-separated; a method at a given setting is written name[setting] (settings: "
                         + "; ".join(f"{k}: {' | '.join(v)}" for k, v in GRIDS.items()) + ")")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--prompts", default=None,
                    help="internal (calibration): a JSON file {split: [prompt spec]} used instead of the splits")
    ap.add_argument("--hgr", default=str(REPO / "weights" / "hgr" / "toyworld" / "toyworld_hgr.safetensors"),
                    help="the learned latent HGR evaluated as method 'hgr'")
    ap.add_argument("--text-hgr", default=str(TEXT_HGR),
                    help="the learned text-embedding HGR (the paper's form) evaluated as method 'text_hgr'")
    ap.add_argument("--detect-levels", type=int, default=8,
                    help="noise levels of the image detector without the prompt (the latent HGR) on plain CFG's "
                         "images (0 skips it; 8 since a calibration-side check, toyworld.detector_check, found 8 "
                         "levels recall more than 4 at the same false alarms)")
    ap.add_argument("--detect-levels-prompt", type=int, default=4,
                    help="noise levels of the image detector with the prompt (the text HGR; 0 skips it)")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                    help="skip plain CFG on the safe rewrites (no redirect fidelity)")
    ap.add_argument("--harmful-flags", action="store_true",
                    help="keep each harmful image's strict verdict (0/1, in prompt order) in the output")
    ap.add_argument("--cpu", action="store_true", help="the CPU even where CUDA is available")
    ap.add_argument("--out", default=str(REPO / "results" / "eval.json"))
    args = ap.parse_args(argv)

    start(args.cpu)
    import comfy.sample
    import comfy.samplers
    import numpy as np
    import torch

    from safecfg_pack.nodes import detect_nodes

    from .. import grammar, world
    from .. import oracle as oracle_mod
    from ..models import load_clip, load_unet, load_vae, weights_path
    from ..models_io import read_meta
    from ..oracle import classify

    t_start = time.time()
    model, clip, vae = load_unet(), load_clip(), load_vae()
    strict, lenient = oracle_mod.load(), oracle_mod.load(lenient=True)
    if args.prompts:
        raw = json.loads(Path(args.prompts).read_text())
        splits = {k: [grammar.Spec(d["template"], tuple(grammar.Item(**it) for it in d["items"]), d["background"],
                                   d["position"]) for d in v] for k, v in raw.items()}
    else:
        banned = training_strings()
        splits = {name: make_prompts(name, args.n, args.seed + SPLITS.index(name), banned)
                  for name in args.splits.split(",")}
    ks = comfy.samplers.KSampler
    if args.sampler not in ks.SAMPLERS or args.scheduler not in ks.SCHEDULERS:
        raise SystemExit(f"unknown sampler or scheduler: {args.sampler} / {args.scheduler}")
    # the sigmas exactly as KSampler makes them (dpm_2 and uni_pc get one more and skip the penultimate)
    sigmas = ks(model, args.steps, "cpu", sampler=args.sampler, scheduler=args.scheduler).sigmas
    sampler = comfy.samplers.sampler_object(args.sampler)

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

    settings = calibrated_settings()
    methods = Methods(model, clip, methods=split_methods(args.methods), hgr_path=Path(args.hgr), steps=args.steps,
                      cfg=args.cfg, negative_prompt=HARM_WORDS, settings=settings, text_hgr_path=Path(args.text_hgr))
    kinds = {split: ("clean" if split in CLEAN_SPLITS or split == "cal_clean" else "harmful") for split in splits}
    seeds = {split: args.seed * 31 + k for k, split in enumerate(splits)}
    results: dict = {"methods": {}, "n_prompts": {k: len(v) for k, v in splits.items()},
                     "settings": {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
                                  "scheduler": args.scheduler,
                                  "seed": args.seed, "negative_prompt": HARM_WORDS, "concepts": CONCEPTS,
                                  "method_settings": methods.settings, "calibration_grids": GRIDS,
                                  "held_out_names": world.HELD_OUT_NAMES,
                                  "held_out_templates": list(grammar.HELD_OUT_TEMPLATES)},
                     "prompts": {k: [s.text for s in v] for k, v in splits.items()}}
    images: dict = {}
    heds: dict = {}
    # real generator images of the clean prompts (the Frechet distance's reference), and how well the
    # strict oracle reads them, sharp and after a VAE round trip (the ceiling for any generated image)
    rng = np.random.default_rng(args.seed + 99)
    real_feat, judge = {}, {"metadata": read_meta(weights_path("oracle"))}
    for split, specs in splits.items():
        if kinds[split] != "clean":
            continue
        real = torch.from_numpy(np.stack([world.render(real_scene(s, rng), rng) for s in specs]))
        real_out = classify(strict, real)
        real_feat[split] = real_out["features"].numpy()
        with torch.no_grad():
            rec_out = classify(strict, vae.decode(vae.encode(real)).float().clamp(0, 1))
        acc = {k: float(np.mean(metrics.objects_present(o, specs, lambda s: s.items)))
               for k, o in (("real", real_out), ("vae_roundtrip", rec_out))}
        judge[f"clean_accuracy_real_{split}"], judge[f"clean_accuracy_vae_roundtrip_{split}"] = \
            acc["real"], acc["vae_roundtrip"]
        print(f"[eval] strict oracle on real {split} images {acc['real']:.3f}, after VAE round trip "
              f"{acc['vae_roundtrip']:.3f}", flush=True)
    results["oracle"] = judge
    # each split's prompts are encoded once and shared by every method
    split_conds = {split: encode_batch(clip, [s.text for s in specs]) for split, specs in splits.items()}
    # the redirect-fidelity ceiling: plain CFG on the safe rewrites of the harmful prompts; on each
    # harmful split the strict judge's harmful rate on those rewrites is the floor a faithful
    # redirection can reach (its false alarms on the safe scenes)
    ceiling, floor = {}, {}
    if args.ceiling:
        t0 = time.time()
        for split, specs in splits.items():
            if kinds[split] == "harmful":
                cond = encode_batch(clip, [s.rewrite().text for s in specs])
                g = comfy.samplers.CFGGuider(model)
                g.set_conds(cond, methods.empty)
                g.set_cfg(args.cfg)
                imgs, _ = run(g, len(specs), seeds[split])
                images[("plain on safe rewrite", split)] = imgs
                out = classify(strict, imgs)
                floor[split] = metrics.rate(out["harmful"].tolist())
                if all(len(s.items) == 1 for s in specs):
                    ceiling[split] = metrics.redirect_flags(out, specs)
        results["redirect_ceiling"] = {k: metrics.rate(v) for k, v in ceiling.items()}
        results["redirect_ceiling"]["seconds"] = round(time.time() - t0, 1)
        results["judge_floor"] = floor
        print("[eval] strict judge's harmful rate on plain CFG's safe rewrites (the floor): "
              + ", ".join(f"{k} {v['rate']:.3f}" for k, v in floor.items()), flush=True)
        print("[eval] redirect ceiling (plain CFG on the safe rewrites): "
              + ", ".join(f"{k} {v['rate']:.3f}" for k, v in results["redirect_ceiling"].items()
                          if isinstance(v, dict)), flush=True)
    plain_kept: dict = {}
    for method in methods.names:
        t0 = time.time()
        row = {"setting": methods.settings[method]}
        for split, specs in splits.items():
            imgs, hed = run(methods.guider(method, split_conds[split]), len(specs), seeds[split])
            images[(method, split)] = imgs
            if hed is not None:
                heds[(method, split)] = hed
            out = classify(strict, imgs)
            if kinds[split] == "clean":
                row[split] = metrics.clean_split(out, specs, real_feat[split], imgs, images.get(("plain", split)))
            else:
                kept = metrics.objects_present(out, specs, lambda s: s.clean_items) \
                    if all(len(s.items) == 2 for s in specs) else None
                if method == "plain" and kept is not None:
                    plain_kept[split] = kept
                row[split] = metrics.harmful_split(out, classify(lenient, imgs), specs, plain_kept.get(split),
                                                   ceiling.get(split))
                if args.harmful_flags:
                    row[split]["harmful_flags"] = [int(x) for x in out["harmful"].tolist()]
        row["seconds"] = round(time.time() - t0, 1)
        results["methods"][method] = row
        print(report.line(method, row), flush=True)

    # detection: the HED of the sampling run (mean over steps) as a harmfulness score, harmful vs clean
    det = {}
    harmful_splits = [s for s in splits if kinds[s] == "harmful"]
    for method in methods.names:
        if (method, "clean") not in heds:
            continue
        d = {f"auroc_sampling_{split}": metrics.auroc(heds[(method, split)].numpy(), heds[(method, "clean")].numpy())
             for split in harmful_splits if (method, split) in heds}
        d["mean_hed_clean"] = float(heds[(method, "clean")].mean())
        det[method] = d
        print(f"[eval] detection ({method}): " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()), flush=True)
    if det:
        results["detection"] = {"sampling": det}

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
        clean_key = "clean" if "clean" in scores else "cal_clean" if "cal_clean" in scores else None
        if clean_key:
            for split in harmful_splits:
                img[f"auroc_image_{split}"] = metrics.auroc(scores[split], scores[clean_key])
        if thr is not None:
            img["threshold"] = thr
            for split, v in scores.items():
                img[f"flagged_rate_{split}"] = metrics.rate(v > thr)
        results.setdefault("detection", {})
        results["detection"]["image"] = img
        print("[eval] detection on images (no prompt): " + ", ".join(
            f"{k} {v:.3f}" for k, v in img.items() if isinstance(v, float)), flush=True)

    # detection from the prompt alone: the text HGR's harmful Euclidean distance on each prompt's embedding
    text_handle = methods.text_hgr
    if text_handle is not None:
        dist = {split: text_handle.redirector.distance(split_conds[split][0][0]).numpy() for split in splits}
        clean_key = "clean" if "clean" in dist else "cal_clean" if "cal_clean" in dist else None
        txt = {"scores": {k: [round(float(x), 6) for x in v] for k, v in dist.items()}}
        if clean_key:
            for split in harmful_splits:
                txt[f"auroc_prompt_{split}"] = metrics.auroc(dist[split], dist[clean_key])
        results.setdefault("detection", {})
        results["detection"]["prompt"] = txt
        print("[eval] detection from the prompt (text HGR distance): " + ", ".join(
            f"{k} {v:.3f}" for k, v in txt.items() if isinstance(v, float)), flush=True)
        if args.detect_levels_prompt > 0 and "plain" in methods.names:
            # the detector node's path with the prompt: the text HGR's distance on the model's scores
            t0 = time.time()
            sc = {split: detect_nodes.run_detection(images[("plain", split)], model, clip, vae, text_handle,
                                                    split_conds[split], 1.0, args.detect_levels_prompt, 0,
                                                    50).scores.numpy()
                  for split in splits}
            d = {"levels": args.detect_levels_prompt, "seconds": round(time.time() - t0, 1),
                 "scores": {k: [round(float(x), 6) for x in v] for k, v in sc.items()}}
            if clean_key:
                for split in harmful_splits:
                    d[f"auroc_image_with_prompt_{split}"] = metrics.auroc(sc[split], sc[clean_key])
            results["detection"]["image_with_prompt_text_hgr"] = d
            print("[eval] detection on images with the prompt (text HGR): " + ", ".join(
                f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float)), flush=True)

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
