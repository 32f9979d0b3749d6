"""Training the text-embedding HGR (the paper's form) with the base model frozen. Plain torch.

The base model enters through a :class:`TextTeacher` (``nodes/teacher.py`` implements it for a ComfyUI
MODEL + CLIP). Teacher states are the base model's own plain-CFG trajectories (as for the latent
HGR). At a state ``x`` of prompt ``p`` with guidance scale ``w``, ComfyUI's CFG gives
``D_u + w (D_c - D_u)``; with the HGR the unconditional prediction is ``D(x, HGR(c))``. The target:

- clean prompts: ``D(x, HGR(c)) = D(x, "")``, so the image is plain CFG's;
- harmful prompts: the guided output equals plain CFG's guided output *on the safe rewrite* ``S(p)``
  at the same ``x``: ``D(x, HGR(c)) = D_e + w / (w - 1) * (D_c - D_s)``, with ``D_c = D(x, p)``,
  ``D_s = D(x, S(p))``, ``D_e = D(x, "")`` (solve ``u + w (D_c - u) = D_e + w (D_s - D_e)`` for
  ``u``).

The loss is the squared error of ``D(x, HGR(c))`` against that target, relative to the size of the
guidance ``D_c - D_e`` at the state (so that every noise level counts alike), backpropagated through
the frozen denoiser into the HGR.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .prompts import PromptData
from .text_hgr import TextHGR, TextHGRConfig, TextHGRNet

log = logging.getLogger("SafeCFG")


class TextTeacher(Protocol):
    latent_channels: int

    def trajectories(self, prompts: list[str], seed: int, steps: int, cfg: float) -> tuple[list, torch.Tensor]:
        """As :class:`safecfg.teacher_cache.Teacher`."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[list[str]]) -> list[torch.Tensor]:
        """As :class:`safecfg.teacher_cache.Teacher`."""

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The text embeddings ``(B, T, D)`` of ``prompts`` (constants)."""

    def denoise_embedding(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``D(x, context)`` for text embeddings ``context`` (B, T, D), differentiable in ``context``."""


@dataclass
class TextStatesSpec:
    states_per_trajectory: int = 4
    steps: int = 20
    cfg: float = 5.0
    batch: int = 32
    seed: int = 0


def unconditional_target(d_c: torch.Tensor, d_s: torch.Tensor, d_e: torch.Tensor, cfg: float) -> torch.Tensor:
    """The unconditional prediction under which CFG at scale ``cfg`` on the prompt gives plain CFG's
    output on the safe rewrite: ``D_e + cfg / (cfg - 1) * (D_c - D_s)`` (``D_e`` when ``D_s = D_c``)."""
    if cfg <= 1.0:
        raise ValueError(f"the text HGR's target needs a guidance scale above 1, got {cfg}")
    return d_e + cfg / (cfg - 1.0) * (d_c - d_s)


def build_states(teacher: TextTeacher, data: PromptData, spec: TextStatesSpec, *,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Teacher states for every prompt of ``data``: ``x``, ``sigma``, ``prompt`` (an index into
    ``texts``), ``target`` (the unconditional target), ``scale`` (``|D_c - D_e|^2`` per state),
    ``harmful``; plus ``embeddings`` (one per text). Harmful and clean prompts are interleaved."""
    items = [(h, s) for h, s in zip(data.harmful, data.safe)] + [(c, c) for c in data.clean]
    random.Random(spec.seed).shuffle(items)
    texts = list(dict.fromkeys(p for p, _ in items))
    index = {t: i for i, t in enumerate(texts)}
    rec: dict[str, list] = {k: [] for k in ("x", "sigma", "prompt", "target", "scale", "harmful")}
    units = [items[i:i + spec.batch] for i in range(0, len(items), spec.batch)]
    for u, unit in enumerate(units):
        if should_stop and should_stop():
            raise InterruptedError("the text HGR's teacher states were cancelled; run again")
        if progress:
            progress(u, len(units))
        prompts, safes = [p for p, _ in unit], [s for _, s in unit]
        gen = torch.Generator().manual_seed(spec.seed * 100_003 + u)
        states, _ = teacher.trajectories(prompts, spec.seed * 100_003 + u, spec.steps, spec.cfg)
        picks = sorted(torch.randperm(len(states), generator=gen)[:spec.states_per_trajectory].tolist())
        for i in picks:
            x, sigma = states[i]
            d_c, d_s, d_e = teacher.denoise(x, sigma, [prompts, safes, [""] * len(prompts)])
            rec["x"].append(x.float())
            rec["sigma"].append(sigma.float().flatten())
            rec["prompt"].append(torch.tensor([index[p] for p in prompts]))
            rec["target"].append(unconditional_target(d_c.float(), d_s.float(), d_e.float(), spec.cfg))
            rec["scale"].append((d_c.float() - d_e.float()).flatten(1).pow(2).mean(1))
            rec["harmful"].append(torch.tensor([p != s for p, s in unit]))
    if progress:
        progress(len(units), len(units))
    out = {k: torch.cat(v) for k, v in rec.items()}
    out["embeddings"] = torch.cat([teacher.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)]).float()
    return out


@dataclass
class TextFitSpec:
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    eval_every: int = 100
    patience: int = 8
    seed: int = 0


def relative_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-state squared error relative to the guidance's size at the state, ``(B,)``."""
    return (pred.float() - target).flatten(1).pow(2).mean(1) / scale.clamp_min(1e-6)


def fit_text_hgr(teacher: TextTeacher, states: dict[str, torch.Tensor], config: TextHGRConfig,
                 empty: torch.Tensor, spec: TextFitSpec, *, family: str = "", categories: list[str] | None = None,
                 progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[TextHGR, dict]:
    """Fit a text HGR to ``states`` (from :func:`build_states`), keeping the weights with the best
    validation loss (a split of the prompts, not of the states); stops early after ``patience``
    evaluations without improvement. Returns the HGR and a summary (losses, the identity's loss)."""
    with torch.inference_mode(False), torch.enable_grad():
        states = {k: v.clone() for k, v in states.items()}  # plain tensors (inputs may be inference tensors)
        return _fit(teacher, states, config, empty.clone(), spec, family, categories, progress, should_stop)


def _fit(teacher, states, config, empty, spec, family, categories, progress, should_stop):
    torch.manual_seed(spec.seed)
    net = TextHGRNet(config, empty)
    prompts = states["prompt"].unique().tolist()
    random.Random(spec.seed).shuffle(prompts)
    n_val = max(1, int(len(prompts) * spec.val_fraction)) if spec.val_fraction > 0 and len(prompts) > 1 else 0
    val_prompts = set(prompts[:n_val])
    is_val = torch.tensor([int(p) in val_prompts for p in states["prompt"]])
    train_idx, val_idx = (~is_val).nonzero().flatten(), is_val.nonzero().flatten()
    if len(train_idx) == 0:
        train_idx = val_idx
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        c = states["embeddings"][states["prompt"][idx]]
        pred = teacher.denoise_embedding(states["x"][idx], states["sigma"][idx], net(c))
        return relative_loss(pred, states["target"][idx], states["scale"][idx])

    def evaluate(idx: torch.Tensor) -> float:
        net.eval()
        with torch.no_grad():
            losses = [loss_on(idx[i:i + spec.batch]) for i in range(0, len(idx), spec.batch)]
        net.train()
        return float(torch.cat(losses).mean()) if losses else math.nan

    eval_idx = val_idx if len(val_idx) else train_idx
    identity = evaluate(eval_idx)
    best, best_state, bad, step, history = identity, {k: v.clone() for k, v in net.state_dict().items()}, 0, 0, []
    net.train()
    for step in range(1, spec.steps + 1):
        if should_stop and should_stop():
            raise InterruptedError("text HGR training was cancelled")
        idx = train_idx[torch.randint(0, len(train_idx), (min(spec.batch, len(train_idx)),), generator=gen)]
        loss = loss_on(idx).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if progress:
            progress(step, spec.steps, float(loss))
        if step % spec.eval_every == 0 or step == spec.steps:
            v = evaluate(eval_idx)
            history.append((step, v))
            if v < best:
                best, bad = v, 0
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= spec.patience:
                    break
    net.load_state_dict(best_state)
    hgr = TextHGR(net.eval(), family=family, categories=categories)
    summary = {"steps": step, "val_loss": best, "identity_val_loss": identity, "history": history,
               "train_states": len(train_idx), "val_states": len(val_idx)}
    return hgr, summary
