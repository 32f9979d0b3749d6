"""Fitting a learned HGR to the teacher cache, and the whole training run (cache, fit, file). Plain torch.

``E_h ||R(g_h) - g*||^2 / ||g*||^2 + lambda E_c ||R(g_c) - g_c||^2 / ||g_c||^2`` with a validation
split, early stopping and seeds; the data come from :mod:`safecfg.teacher_cache`, the prompts from
:mod:`safecfg.prompts`. The command line is ``python -m commands.train_hgr``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .hgr_net import HGRConfig, HGRNet, LearnedHGR
from .prompts import PromptData
from .teacher_cache import CacheSpec, Teacher, build_cache, load_cache

log = logging.getLogger("SafeCFG")


def _rel_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).sum(1) / b.flatten(1).pow(2).sum(1).clamp_min(1e-8)


@dataclass
class FitSpec:
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    clean_weight: float = 1.0
    val_fraction: float = 0.1
    eval_every: int = 100
    patience: int = 8
    seed: int = 0


def fit(cache: dict[str, torch.Tensor], config: HGRConfig, spec: FitSpec, *, latent_format: str = "",
        categories: list[str] | None = None, device: str | torch.device = "cpu",
        progress: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> tuple[LearnedHGR, dict]:
    """Fit an HGR to a teacher cache. Returns the best (validation) HGR and a training summary.

    Works inside ComfyUI's node execution, which runs in inference mode: gradients are re-enabled here.
    """
    with torch.inference_mode(False), torch.enable_grad():
        cache = {k: v.clone() if v.is_inference() else v for k, v in cache.items()}
        return _fit(cache, config, spec, latent_format=latent_format, categories=categories, device=device,
                    progress=progress, should_stop=should_stop)


def _fit(cache, config, spec, *, latent_format, categories, device, progress, should_stop):
    torch.manual_seed(spec.seed)
    n = cache["g"].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    n_val = max(1, int(n * spec.val_fraction))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    net = HGRNet(config).to(device)
    hgr = LearnedHGR(net, latent_format=latent_format, categories=categories)
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=1e-4)
    harmful = cache["harmful"].bool()

    def loss_on(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = cache["g"][idx].to(device)
        u = cache["uncond"][idx].to(device)
        s = cache["sigma"][idx].to(device)
        t = cache["target"][idx].to(device)
        h = harmful[idx].to(device)
        r = g + hgr.delta(g, s, u)
        target = torch.where(h.view(-1, 1, 1, 1), t, g)
        per = _rel_sq(r, target)
        w = torch.where(h, torch.ones_like(per), torch.full_like(per, spec.clean_weight))
        hl = per[h].mean() if h.any() else per.new_zeros(())
        cl = per[~h].mean() if (~h).any() else per.new_zeros(())
        return (per * w).sum() / w.sum(), hl, cl

    best, best_state, bad, history = math.inf, None, 0, []
    step = 0
    for step in range(1, spec.steps + 1):
        if should_stop and should_stop():
            raise InterruptedError("HGR training was cancelled")
        lr = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = tr_idx[torch.randint(len(tr_idx), (spec.batch,))]
        net.train()
        loss, _, _ = loss_on(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            net.eval()
            with torch.no_grad():
                vl, vh, vc = (torch.stack(t).mean().item() for t in zip(
                    *[loss_on(val_idx[i:i + 256]) for i in range(0, len(val_idx), 256)]))
            history.append({"step": step, "train": loss.item(), "val": vl, "val_harmful": vh, "val_clean": vc})
            if vl < best - 1e-5:
                best, bad = vl, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
            if progress:
                progress(step, spec.steps, vl)
            if bad >= spec.patience:
                log.info("[SafeCFG] early stop at step %d (best val %.4f)", step, best)
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    # baseline: the identity's validation loss (how much the HGR improves on doing nothing)
    with torch.no_grad():
        g, t, h = cache["g"][val_idx], cache["target"][val_idx], harmful[val_idx]
        ident = _rel_sq(g, torch.where(h.view(-1, 1, 1, 1), t, g))
        ident_h = ident[h].mean().item() if h.any() else 0.0
    summary = {"steps": step, "best_val": best, "identity_val_harmful": ident_h, "n_train": len(tr_idx),
               "n_val": n_val, "history": history[-20:], "fit": spec.__dict__}
    return hgr, summary


def train_hgr(teacher: Teacher, data: PromptData, cache_dir: str | os.PathLike, out_path: str | os.PathLike, *,
              cache_spec: CacheSpec | None = None, fit_spec: FitSpec | None = None,
              config: HGRConfig | None = None, base_model: str = "", device: str | torch.device = "cpu",
              progress: Callable[[str, int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[LearnedHGR, dict]:
    """Cache (resumable) -> fit -> validated .safetensors. ``progress(stage, done, total)``."""
    from .hgr_file import load_hgr, save_hgr

    cache_spec, fit_spec = cache_spec or CacheSpec(), fit_spec or FitSpec()
    config = config or HGRConfig(latent_channels=teacher.latent_channels)
    paths = build_cache(teacher, data, cache_dir, cache_spec, should_stop=should_stop,
                        progress=(lambda d, t: progress("cache", d, t)) if progress else None)
    cache = load_cache(cache_dir, paths)  # shards left from a larger prompt file are not used
    hgr, summary = fit(cache, config, fit_spec, latent_format=getattr(teacher, "latent_format", ""),
                       categories=data.category_names, device=device, should_stop=should_stop,
                       progress=(lambda d, t, v: progress("fit", d, t)) if progress else None)
    summary["cache"] = {"samples": int(cache["g"].shape[0]), **cache_spec.__dict__}
    if "latent_frames" in cache:  # trained on video clips, frame by frame
        hgr.latent_frames = int(cache["latent_frames"])
        summary["cache"]["latent_frames"] = hgr.latent_frames
    save_hgr(out_path, hgr, base_model=base_model, training=summary)
    load_hgr(out_path)  # what was written must load and validate
    return hgr, summary
