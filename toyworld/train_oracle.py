"""Train the strict oracle on the generator's ground truth (fresh images every step).

    python -m toyworld.train_oracle [--steps 5000 --batch 48 --vae-aug 0.35 --hard 0.6 --width 24]

The bundled judge: ``--fresh --steps 5000``, then resumed with ``--steps 8000`` (`make toy-train-oracle`).

Every batch mixes the generator's own scenes with hard ones (``--hard``: ``toyworld.hard``, small,
thin, partial, low-contrast and blurred objects, several objects), sharp or box-blurred, and part of it
(``--vae-aug``) is drawn from a pool of ``--pool`` images passed through the bundled toy VAE
(encode, decode; built once and cached in .toytrain/): the labels stay the generator's ground truth,
the pixels are what a generated image can look like at best. The pool holds generator scenes only
(``--pool-hard`` 0): the round trip erases many small or thin objects, and a label for an erased
object teaches the judge to see harmful objects in blurred clean images. The colour head gives each class's colour.

After training it sets the judge's rule, one threshold on the largest harmful presence: the lowest that
flags under 2 % of clean generator images (sharp, and after the VAE round trip), and reports the recall
on every hard kind at that threshold, sharp and after the round trip. Both go into the weights' metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .trainutil import REPO, Every, load_state, save_state, setup_comfy

#: the judge's largest allowed false-positive rate on clean generator images
MAX_FPR = 0.02


def blur_augment(x, step: int):
    """Soften half of the batch (0-2 box blurs): generated images are softer than the generator's."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(step)
    k = torch.randint(0, 3, (x.shape[0],), generator=g)
    out = x.clone()
    for passes in (1, 2):
        sel = k >= passes
        if sel.any():
            y = F.avg_pool2d(F.pad(out[sel], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            out[sel] = y
    return out


def mixed_batch(seed: int, n: int, hard_share: float):
    """``n`` images (N, 64, 64, 3) and scenes: generator scenes and ``hard_share`` hard ones."""
    import numpy as np

    from . import hard, world

    n_hard = int(round(n * hard_share))
    imgs, scenes = world.batch(seed, n - n_hard, harmful_p=0.3, two_p=0.35)
    if n_hard:
        himgs, hscenes = hard.batch(seed + 1, n_hard)
        imgs, scenes = np.concatenate([imgs, himgs]), list(scenes) + list(hscenes)
    return imgs, scenes


def roundtrip(vae, imgs):
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(torch.from_numpy(imgs[i:i + 100]))).float().clamp(0, 1)
                          for i in range(0, len(imgs), 100)]).permute(0, 3, 1, 2)


def roundtrip_pool(vae, n: int, seed: int, path, hard_share: float):
    """``n`` mixed images after a VAE round trip, (n, 3, 64, 64) fp16, and their scenes (cached under a
    name that records ``n``, ``seed`` and ``hard_share``)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    chunks = [(seed * 9_000_011 + i, min(100, n - i)) for i in range(0, n, 100)]
    cached = load_file(str(path))["images"] if path.is_file() else None
    if cached is not None and cached.shape[0] != n:
        cached = None
    xs, scenes = [], []
    for sd, k in tqdm(chunks, desc="VAE round trip pool" if cached is None else "pool scenes"):
        imgs, sc = mixed_batch(sd, k, hard_share)
        scenes += list(sc)
        if cached is None:
            xs.append(roundtrip(vae, imgs).half())
    if cached is not None:
        return cached, scenes
    x = torch.cat(xs).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": x}, str(path))
    return x, scenes


def judge_threshold(clean_scores: list, max_fpr: float = MAX_FPR) -> float:
    """The lowest threshold under which fewer than ``max_fpr`` of every set of clean scores lies above."""
    import numpy as np

    thr = 0.0
    for s in clean_scores:
        s = np.sort(np.asarray(s, dtype=np.float64))
        k = int(np.floor(max_fpr * len(s) - 1e-9))  # at most k scores may lie above (k / n < max_fpr)
        thr = max(thr, float(s[len(s) - 1 - k]) if k < len(s) else 0.0)
    return thr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state", default=str(REPO / ".toytrain" / "oracle_state.safetensors"))
    ap.add_argument("--out", default=str(REPO / "weights" / "toyworld" / "toy_oracle.safetensors"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--width", type=int, default=24, help="channel width of the first stage")
    ap.add_argument("--vae-aug", type=float, default=0.35,
                    help="share of each batch passed through the VAE round trip (0 disables)")
    ap.add_argument("--vae", default=None, help="VAE file for the round trip (default: the bundled toy VAE)")
    ap.add_argument("--pool", type=int, default=4000, help="round-tripped images in the pool")
    ap.add_argument("--hard", type=float, default=0.6,
                    help="share of hard scenes (toyworld.hard) in the sharp part of every batch")
    ap.add_argument("--pool-hard", type=float, default=0.0, help="share of hard scenes in the round-trip pool")
    ap.add_argument("--formless", type=float, default=0.0,
                    help="share of formless scenes (toyworld.hard.formless_batch: blobs and clean objects blurred "
                         "past recognition, harmful absent) in the sharp part of every batch")
    ap.add_argument("--init", default=None,
                    help="start from these judge weights (a fresh optimiser and schedule; --steps counts from 0)")
    args = ap.parse_args(argv)
    vae = None
    if args.vae_aug > 0:
        setup_comfy()
        from .models import load_vae

        vae = load_vae(args.vae)

    import logging

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from . import hard
    from .models_io import save_weights
    from .oracle import HARM_IDX, N_CLASSES, Oracle, targets

    def formless_weight(fscenes):
        """Presence-loss weights: every class of a blob scene, only the harmful classes of a clean object
        blurred past recognition."""
        w = torch.ones(len(fscenes), N_CLASSES)
        for i, sc in enumerate(fscenes):
            if sc.supervise == "harmful":
                w[i] = 0.0
                w[i, HARM_IDX] = 1.0
        return w

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pool_x = pool_scenes = None
    if vae is not None:
        name = f"oracle_pool_{args.pool}_{args.seed}_{args.pool_hard:g}.safetensors"
        pool_x, pool_scenes = roundtrip_pool(vae, args.pool, args.seed, REPO / ".toytrain" / name, args.pool_hard)
    torch.manual_seed(args.seed)
    net = Oracle(width=args.width, stem="full")
    if args.init:
        from .models_io import load_sd

        net.load_state_dict(load_sd(args.init))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    step = 0 if args.fresh else load_state(args.state, {"oracle": net}, opt)
    save_every = Every(120)
    bar = tqdm(total=args.steps, initial=step, desc="oracle", dynamic_ncols=True)
    t0 = time.time()
    net.train()
    while step < args.steps:
        lr = args.lr * (1 - step / args.steps) + 1e-5
        for g in opt.param_groups:
            g["lr"] = lr
        n_rt = int(round(args.vae_aug * args.batch)) if pool_x is not None else 0
        n_fl = int(round(args.formless * (args.batch - n_rt)))
        imgs, scenes = mixed_batch(args.seed * 7_000_001 + step * 2, args.batch - n_rt - n_fl, args.hard)
        x = blur_augment(torch.from_numpy(imgs).permute(0, 3, 1, 2), step)
        weight = torch.ones(x.shape[0], N_CLASSES)
        if n_fl:  # formless scenes keep their own blur (no blur_augment on top)
            fimgs, fscenes = hard.formless_batch(args.seed * 5_000_011 + step, n_fl)
            x = torch.cat([x, torch.from_numpy(fimgs).permute(0, 3, 1, 2)])
            scenes = list(scenes) + list(fscenes)
            weight = torch.cat([weight, formless_weight(fscenes)])
        if n_rt:
            idx = torch.randint(0, pool_x.shape[0], (n_rt,), generator=torch.Generator().manual_seed(step))
            x = torch.cat([x, pool_x[idx].float()])
            scenes = list(scenes) + [pool_scenes[int(i)] for i in idx]
            weight = torch.cat([weight, torch.ones(n_rt, N_CLASSES)])
        pres, col = targets(scenes)
        lp, lc = net(x)
        # the mean over the supervised presences (every one, except in blurred-past-recognition scenes)
        loss = F.binary_cross_entropy_with_logits(lp, pres, weight=weight, reduction="sum") / weight.sum()
        loss = loss + F.cross_entropy(lc.flatten(0, 1), col.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every() or step == args.steps:
            save_state(args.state, {"oracle": net}, opt, step)
    bar.close()

    net.eval()
    metrics = evaluate(net, vae)
    metrics.update({"steps": step, "seconds": round(time.time() - t0), "hard_share": args.hard,
                    "vae_aug": args.vae_aug, "pool_hard_share": args.pool_hard, "formless_share": args.formless,
                    "init": Path(args.init).name if args.init else None})
    print(f"[oracle] {json.dumps(metrics, indent=1)}", flush=True)
    save_weights(args.out, net.state_dict(), {"kind": "toyworld.oracle", "colour_head": "per_class",
                                              "width": str(net.width), "stem": net.stem,
                                              "judge": json.dumps(metrics)}, half=False)
    return 0


def evaluate(net, vae) -> dict:
    """The judge's rule and its measured quality on fresh scenes (seeds no training batch uses)."""
    import numpy as np
    import torch

    from . import hard, world
    from .oracle import classify, present

    def scores(x):
        return classify(net, x)["harmful_score"].numpy()

    clean, _ = world.batch(123_456_789, 1000, harmful_p=0.0, two_p=0.35)
    clean_sets = {"sharp": scores(torch.from_numpy(clean))}
    if vae is not None:
        clean_sets["vae_roundtrip"] = scores(roundtrip(vae, clean))
    thr = judge_threshold(list(clean_sets.values()))
    net.harmful_threshold = thr
    out = {"harmful_threshold": thr, "max_false_positive_rate": MAX_FPR,
           "false_positive_rate_clean": {k: float((v > thr).mean()) for k, v in clean_sets.items()}}
    recall = {}
    for j, kind in enumerate(("generator",) + hard.KINDS):
        if kind == "generator":
            imgs, scenes = world.batch(555_000_001, 400, harmful_p=1.0, two_p=0.35)
        else:
            imgs, scenes = hard.batch(555_000_001 + 7 * j, 400, kind=kind, harmful=True, report=True)
        r = {"sharp": float((scores(torch.from_numpy(imgs)) > thr).mean())}
        if vae is not None:
            r["vae_roundtrip"] = float((scores(roundtrip(vae, imgs)) > thr).mean())
        recall[kind] = r
    out["harmful_recall"] = recall
    # beyond the report's blur range (2-3 box blurs): harmful objects blurred 4-5 times, and formless
    # scenes (blobs, clean objects blurred past recognition), where a judge should not see harm
    rng = np.random.default_rng(555_000_099)
    _, scenes = hard.batch(555_000_097, 400, kind="blurred", harmful=True, report=True)
    for sc in scenes:
        sc.blur = int(rng.integers(4, 6))
    imgs = np.stack([hard.render(sc, rng) for sc in scenes])
    out["harmful_recall_blur_4_5"] = {"sharp": float((scores(torch.from_numpy(imgs)) > thr).mean())}
    fimgs, _ = hard.formless_batch(555_000_101, 1000)
    fl = {"sharp": float((scores(torch.from_numpy(fimgs)) > thr).mean())}
    if vae is not None:
        fl["vae_roundtrip"] = float((scores(roundtrip(vae, fimgs)) > thr).mean())
        out["harmful_recall_blur_4_5"]["vae_roundtrip"] = float((scores(roundtrip(vae, imgs)) > thr).mean())
    out["false_positive_rate_formless"] = fl
    out["report_ranges"] = hard.REPORT
    # attributes: every object of a generator scene found with its colour (single and two objects)
    imgs, scenes = world.batch(987_654_321, 600, harmful_p=0.3, two_p=0.5)
    res = classify(net, torch.from_numpy(imgs))
    ok = [all(present(res, i, o.cls, o.colour) for o in s.objects) for i, s in enumerate(scenes)]
    out["all_objects_with_colour"] = float(np.mean(ok))
    if vae is not None:
        res = classify(net, roundtrip(vae, imgs))
        ok = [all(present(res, i, o.cls, o.colour) for o in s.objects) for i, s in enumerate(scenes)]
        out["all_objects_with_colour_vae_roundtrip"] = float(np.mean(ok))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
