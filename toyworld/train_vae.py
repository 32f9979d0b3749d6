"""Train the toy world's TAESD-architecture VAE (64x64 RGB <-> 8x8x4, SD1.5 latent format).

    python -m toyworld.train_vae [--steps 1200 --batch 16 --seed 0]

Resumable: state in .toytrain/vae_state.safetensors; the bundle file is written at the end with
``vae_scale``/``vae_shift`` set so that SD1.5-format latents (x 0.18215) have unit variance.
"""

from __future__ import annotations

import argparse
import math
import time

from .trainutil import REPO, Every, init_module_, load_state, log, save_state, setup_comfy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", default=str(REPO / ".toytrain" / "vae_state.safetensors"))
    ap.add_argument("--out", default=None, help="bundle file (default weights/toyworld/toy_vae.safetensors)")
    ap.add_argument("--fresh", action="store_true", help="ignore a saved state and start over")
    args = ap.parse_args(argv)

    setup_comfy()
    import torch
    from tqdm import tqdm

    from . import world
    from .models import new_vae_module, save_weights, weights_path

    torch.manual_seed(args.seed)
    taesd = new_vae_module()
    init_module_(taesd, args.seed)
    enc, dec = taesd.taesd_encoder, taesd.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    step = 0 if args.fresh else load_state(args.state, {"enc": enc, "dec": dec}, opt)
    if step:
        log.info("[vae] resuming at step %d", step)
    save_every = Every(120)
    bar = tqdm(total=args.steps, initial=step, desc="vae", dynamic_ncols=True)
    t0 = time.time()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, _ = world.batch(args.seed * 1_000_003 + step, args.batch, harmful_p=0.25)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        z = enc(x)
        zn = z + 0.1 * torch.randn_like(z)  # a smooth latent space: the decoder must tolerate small errors
        rec = dec(zn)
        # objects are small and saturated, backgrounds grey: weight colourful pixels up so the
        # objects (what the benchmark is about) are learned first
        w = 1.0 + 20.0 * (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True))
        err = (rec - x).abs() + (rec - x).pow(2)
        loss = (err * w).mean() / w.mean() + 1e-3 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if save_every() or step == args.steps:
            save_state(args.state, {"enc": enc, "dec": dec}, opt, step)
    bar.close()
    log.info("[vae] trained %d steps in %.0f s", step, time.time() - t0)

    # latent statistics -> vae_scale / vae_shift for the SD1.5 latent format (x 0.18215 -> unit variance)
    with torch.no_grad():
        imgs, _ = world.batch(999_999, 256, harmful_p=0.25)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        z = torch.cat([enc(x[i:i + 64]) for i in range(0, 256, 64)])
        rec = torch.cat([dec(z[i:i + 64]) for i in range(0, 256, 64)])
        mae = (rec - x).abs().mean().item()
        mean, std = z.mean().item(), z.std().item()
    scale = std * 0.18215
    shift = -mean / scale
    taesd.vae_scale.data.fill_(scale)
    taesd.vae_shift.data.fill_(shift)
    out = args.out or weights_path("vae")
    save_weights(out, taesd.state_dict(), {"kind": "toyworld.vae", "arch": "taesd", "steps": str(step),
                                           "seed": str(args.seed), "reconstruction_mae": f"{mae:.4f}",
                                           "latent_mean": f"{mean:.4f}", "latent_std": f"{std:.4f}"})
    log.info("[vae] wrote %s (reconstruction MAE %.4f, raw latent mean %.3f std %.3f)", out, mae, mean, std)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
