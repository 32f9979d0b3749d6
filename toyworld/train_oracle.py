"""Train the oracle classifier on the generator's ground truth (fresh images every step).

    python -m toyworld.train_oracle [--steps 800 --batch 48]
"""

from __future__ import annotations

import argparse
import time

from .trainutil import REPO, Every, load_state, log, save_state


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--state", default=str(REPO / ".toytrain" / "oracle_state.safetensors"))
    ap.add_argument("--out", default=str(REPO / "weights" / "toyworld" / "toy_oracle.safetensors"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)

    import logging

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from . import world
    from .models_io import save_weights
    from .oracle import Oracle, classify, targets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
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
        imgs, scenes = world.batch(args.seed * 7_000_001 + step, args.batch, harmful_p=0.3, two_p=0.35)
        x = blur_augment(torch.from_numpy(imgs).permute(0, 3, 1, 2), step)
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
    metrics = {"object_accuracy": obj_ok / len(scenes), "colour_accuracy": col_ok / len(scenes),
               "harmful_recall": recall, "harmful_false_positive_rate": fpr, "two_object_exact": multi,
               "steps": step, "seconds": round(time.time() - t0)}
    log.info("[oracle] %s", metrics)
    save_weights(args.out, net.state_dict(), {"kind": "toyworld.oracle", **{k: str(v) for k, v in metrics.items()}},
                 half=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
