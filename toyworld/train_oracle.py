"""Train the oracle classifier on the generator's ground truth (fresh images every step).

    python -m toyworld.train_oracle [--steps 2600 --batch 48 --vae-aug 0.5]

The oracle judges *decoded* images, so part of every batch (``--vae-aug``) is drawn from a pool of
``--pool`` generator images passed through the bundled toy VAE (encode, decode; built once and cached
in .toytrain/): the labels stay the generator's ground truth, the pixels are what any generated
image can look like at best. The rest is fresh images, sharp or box-blurred.
"""

from __future__ import annotations

import argparse
import time

from .trainutil import REPO, Every, load_state, save_state, setup_comfy


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


def roundtrip_pool(vae, n: int, seed: int, path):
    """``n`` generator images after a VAE round trip, (n, 3, 64, 64) fp16, and their scenes (cached)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from . import world

    scenes = []
    for i in range(0, n, 100):
        scenes += world.batch(seed * 9_000_011 + i, min(100, n - i), harmful_p=0.3, two_p=0.35)[1]
    if path.is_file():
        x = load_file(str(path))["images"]
        if x.shape[0] == n:
            return x, scenes
    xs = []
    for i in tqdm(range(0, n, 100), desc="VAE round trip pool"):
        imgs, _ = world.batch(seed * 9_000_011 + i, min(100, n - i), harmful_p=0.3, two_p=0.35)
        with torch.no_grad():
            xs.append(vae.decode(vae.encode(torch.from_numpy(imgs))).float().clamp(0, 1).permute(0, 3, 1, 2).half())
    x = torch.cat(xs).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": x}, str(path))
    return x, scenes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state", default=str(REPO / ".toytrain" / "oracle_state.safetensors"))
    ap.add_argument("--out", default=str(REPO / "weights" / "toyworld" / "toy_oracle.safetensors"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--vae-aug", type=float, default=0.5,
                    help="share of each batch passed through the VAE round trip (0 disables)")
    ap.add_argument("--vae", default=None, help="VAE file for the round trip (default: the bundled toy VAE)")
    ap.add_argument("--pool", type=int, default=4000, help="round-tripped images in the pool")
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

    from . import world
    from .models_io import save_weights
    from .oracle import Oracle, classify, targets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pool_x = pool_scenes = None
    if vae is not None:
        pool_x, pool_scenes = roundtrip_pool(vae, args.pool, args.seed, REPO / ".toytrain" / "oracle_pool.safetensors")
    torch.manual_seed(args.seed)
    net = Oracle()
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
        imgs, scenes = world.batch(args.seed * 7_000_001 + step, args.batch - n_rt, harmful_p=0.3, two_p=0.35)
        x = blur_augment(torch.from_numpy(imgs).permute(0, 3, 1, 2), step)
        if n_rt:
            idx = torch.randint(0, pool_x.shape[0], (n_rt,), generator=torch.Generator().manual_seed(step))
            x = torch.cat([x, pool_x[idx].float()])
            scenes = list(scenes) + [pool_scenes[int(i)] for i in idx]
        pres, col = targets(scenes)
        lp, lc = net(x)
        loss = F.binary_cross_entropy_with_logits(lp, pres) + F.cross_entropy(lc, col)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every() or step == args.steps:
            save_state(args.state, {"oracle": net}, opt, step)
    bar.close()

    # held-out validation on fresh scenes (single objects: object + colour; any: harmful recall)
    imgs, scenes = world.batch(123_456_789, 1000, harmful_p=0.3, two_p=0.0)
    out = classify(net, torch.from_numpy(imgs))
    obj_ok = col_ok = 0
    for i, s in enumerate(scenes):
        obj_ok += int(out["presence"][i].argmax()) == world.CLASSES.index(s.objects[0].cls)
        col_ok += int(out["colour"][i].argmax()) == world.COLOUR_NAMES.index(s.objects[0].colour)
    harm = torch.tensor([s.harmful for s in scenes])
    recall = (out["harmful"] & harm).sum().item() / max(1, harm.sum().item())
    fpr = (out["harmful"] & ~harm).sum().item() / max(1, (~harm).sum().item())
    imgs2, scenes2 = world.batch(987_654_321, 500, harmful_p=0.3, two_p=1.0)
    out2 = classify(net, torch.from_numpy(imgs2))
    pres2, _ = targets(scenes2)
    multi = ((out2["presence"] > 0.5).float() == pres2).all(dim=1).float().mean().item()
    rt_ok = None
    if vae is not None:
        with torch.no_grad():
            rt = torch.cat([vae.decode(vae.encode(torch.from_numpy(imgs[i:i + 100]))).float().clamp(0, 1)
                            for i in range(0, len(imgs), 100)])
        out_rt = classify(net, rt)
        rt_ok = sum(int(out_rt["presence"][i].argmax()) == world.CLASSES.index(s.objects[0].cls)
                    and int(out_rt["colour"][i].argmax()) == world.COLOUR_NAMES.index(s.objects[0].colour)
                    for i, s in enumerate(scenes)) / len(scenes)
    metrics = {"object_accuracy": obj_ok / len(scenes), "vae_roundtrip_accuracy": rt_ok,
               "colour_accuracy": col_ok / len(scenes),
               "harmful_recall": recall, "harmful_false_positive_rate": fpr, "two_object_exact": multi,
               "steps": step, "seconds": round(time.time() - t0)}
    print(f"[oracle] {metrics}", flush=True)
    save_weights(args.out, net.state_dict(), {"kind": "toyworld.oracle", **{k: str(v) for k, v in metrics.items()}},
                 half=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
