"""Train the toy world's SD1.5-family UNet and its tiny CLIP text encoder together, with condition
dropout for classifier-free guidance, on latents of the trained toy VAE.

    python -m toyworld.train_unet [--steps 6000 --batch 64 --scenes 12000]

Stage 1 (once, resumable): render ``--scenes`` scenes and encode them with ComfyUI's VAE object
(exactly the inference path) into .toytrain/latents.safetensors. Stage 2: eps-prediction training
on ComfyUI's discrete SD1.5 schedule; captions are re-drawn every step (random attribute drops, any
name of the object, held-out names included: the diffusion model knows every name). EMA weights are
exported to weights/toyworld/toy_unet.safetensors and toy_clip.safetensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from .trainutil import REPO, Every, init_module_, load_state, log, save_state, setup_comfy

STATE = REPO / ".toytrain"


def encode_dataset(n: int, seed: int, path, vae_path=None):
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from . import world
    from .models import load_vae

    if path.is_file():
        d = load_file(str(path))
        if d["latents"].shape[0] == n:
            return d["latents"], json.loads(path.with_suffix(".json").read_text())
    vae = load_vae(vae_path)
    rng_seed = seed * 10_007
    lats, recs = [], []
    for i in tqdm(range(0, n, 64), desc="encode"):
        imgs, scenes = world.batch(rng_seed + i, min(64, n - i), harmful_p=0.3, two_p=0.3)
        with torch.no_grad():
            lats.append(vae.encode(torch.from_numpy(imgs)).float() * 0.18215)
        for s in scenes:
            recs.append({"bg": s.background, "objs": [dict(cls=o.cls, colour=o.colour, size=o.size,
                                                          pos=getattr(o, "pos", "center")) for o in s.objects]})
    latents = torch.cat(lats)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(recs))
    return latents, recs


def te_forward(te, ids):
    """ComfyUI's SD1 CLIP forward (causal mask, last layer, final layer norm) without its in-place
    residual adds, so that it can be trained with autograd. Same modules, same weights."""
    import torch
    from comfy.clip_model import optimized_attention_for_device

    tm = te.transformer.text_model
    x = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight
    causal = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype).triu_(1)
    attn = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), causal, attn)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def caption_for(rec: dict, rng, held_out_p: float = 0.0) -> str:
    from . import grammar, world

    objs = []
    for o in rec["objs"]:
        names = world.CLASS_NAMES[o["cls"]]
        ob = world.Obj(o["cls"], o["colour"], 0.5, 0.5, o["size"], names[rng.integers(len(names))])
        ob.pos = o["pos"]
        objs.append(ob)
    return grammar.generator_caption(objs, rec["bg"], rng, held_out_p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: after 20 steps, set --steps to what fits (recorded in the weights)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=5000)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--held-out-p", type=float, default=0.0,
                    help="share of captions worded with the held-out templates (toyworld.grammar), which the "
                         "generator must draw but SafeCFG never trains on")
    ap.add_argument("--init", action="store_true",
                    help="start from the exported weights (weights/toyworld) with a fresh optimiser and schedule "
                         "(a fine-tuning stage; its own state file)")
    ap.add_argument("--state-dir", default=str(STATE), help="resumable state and encoded dataset")
    ap.add_argument("--vae", default=None, help="VAE file for encoding (default: the bundled toy VAE)")
    ap.add_argument("--export-dir", default=None, help="where to write toy_unet/toy_clip (default weights/toyworld)")
    args = ap.parse_args(argv)
    state_dir = Path(args.state_dir)

    setup_comfy()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .models import clip_token_ids, new_clip, new_unet, save_weights, weights_path

    latents, recs = encode_dataset(args.scenes, args.seed, state_dir / "latents.safetensors", args.vae)
    log.info("[unet] dataset: %d latents, std %.3f", latents.shape[0], latents.std().item())

    torch.manual_seed(args.seed)
    mp = new_unet()
    unet = mp.model.diffusion_model
    init_module_(unet, args.seed)
    ms = mp.model.model_sampling
    clip = new_clip()
    te = clip.cond_stage_model.clip_l
    init_module_(te, args.seed + 1)
    with torch.no_grad():
        emb = te.transformer.text_model.embeddings
        emb.token_embedding.weight.mul_(0.02)
        emb.position_embedding.weight.mul_(0.01)
    unet.requires_grad_(True).train()  # comfy.sd.CLIP freezes its encoder; training needs gradients
    te.requires_grad_(True).train()
    params = list(unet.parameters()) + list(te.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    log.info("[unet] UNet %.2f M params, text encoder %.2f M params", n_unet / 1e6,
             sum(p.numel() for p in te.parameters()) / 1e6)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    modules = {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te}
    state_file = state_dir / ("unet_finetune_state.safetensors" if args.init else "unet_state.safetensors")
    step = 0 if args.fresh else load_state(state_file, modules, opt)
    if args.init and step == 0:
        from .models import load_sd

        usd = load_sd(weights_path("unet"))
        csd = {k[len("clip_l."):]: v for k, v in load_sd(weights_path("clip")).items()}
        for m, sd in ((unet, usd), (ema_unet, usd), (te, csd), (ema_te, csd)):
            m.load_state_dict(sd, strict=False)
        log.info("[unet] fine-tuning from the exported weights")
    if step:
        log.info("[unet] resuming at step %d", step)
    tok_cache: dict[str, list[int]] = {}

    def tokens(text):
        if text not in tok_cache:
            tok_cache[text] = clip_token_ids(clip, text)
        return tok_cache[text]

    # the differentiable forward must equal ComfyUI's inference path exactly
    probe = ["a red star on dots", "", "a large purple machete at the left"]
    with torch.no_grad():
        ref, _ = te([tokens(t) for t in probe])
        mine = te_forward(te, torch.tensor([tokens(t) for t in probe]))
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)

    sigmas = ms.sigmas.float()
    save_every = Every(180)
    bar = tqdm(total=args.steps, initial=step, desc="unet", dynamic_ncols=True)
    t0 = time.time()
    budget_start, budget_step = time.time(), step
    while step < args.steps:
        if args.minutes and step == budget_step + 20:
            per = (time.time() - budget_start) / 20
            args.steps = step + int((args.minutes * 60 - (time.time() - budget_start)) / per)
            bar.total = args.steps
            log.info("[unet] %.2f s/step: training %d steps in total to fit %.0f minutes", per, args.steps,
                     args.minutes)
        warm = min(1.0, (step + 1) / (50 if args.init else 200))
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng(args.seed * 1_000_003 + step)
        idx = rng.integers(0, latents.shape[0], args.batch)
        x0 = latents[idx]
        texts = ["" if rng.uniform() < args.cond_drop else caption_for(recs[i], rng, args.held_out_p) for i in idx]
        ctx = te_forward(te, torch.tensor([tokens(t) for t in texts]))
        t = torch.from_numpy(rng.integers(0, len(sigmas), args.batch))
        sigma = sigmas[t].view(-1, 1, 1, 1)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        x_in = (x0 + noise * sigma) / torch.sqrt(sigma ** 2 + 1)
        eps = unet(x_in, timesteps=ms.timestep(sigma.flatten()).float(), context=ctx)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - d)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if save_every() or step == args.steps:
            save_state(state_file, modules, opt, step)
            export(ema_unet, ema_te, step, args, save_weights, weights_path, time.time() - t0)
            log.info("[unet] step %d: exported EMA weights", step)
    bar.close()
    log.info("[unet] done: %d steps", step)
    return 0


def export(ema_unet, ema_te, step, args, save_weights, weights_path, seconds):
    from .models import CLIP_CONFIG, UNET_CONFIG

    meta = {"steps": str(step), "seed": str(args.seed), "batch": str(args.batch), "scenes": str(args.scenes),
            "cond_drop": str(args.cond_drop), "ema": str(args.ema), "held_out_p": str(args.held_out_p)}
    if args.init:
        meta["finetune"] = json.dumps({"from": "the exported weights", "steps": step, "lr": args.lr,
                                       "held_out_p": args.held_out_p})
    out = Path(args.export_dir) if args.export_dir else None
    save_weights(out / "toy_unet.safetensors" if out else weights_path("unet"), ema_unet.state_dict(),
                 {"kind": "toyworld.unet", "config": json.dumps(UNET_CONFIG), **meta})
    sd = {f"clip_l.{k}": v for k, v in ema_te.state_dict().items()}
    save_weights(out / "toy_clip.safetensors" if out else weights_path("clip"), sd,
                 {"kind": "toyworld.clip", "config": json.dumps(CLIP_CONFIG), **meta})


if __name__ == "__main__":
    raise SystemExit(main())
