"""Unsupervised safe fine-tuning: a LoRA on the UNet that bakes the HGR's redirection into the
model's conditional prediction, weighted by the HGR's own harmfulness score (HED). No labels.

For a state ``x`` at noise ``sigma`` of the base model's own plain-CFG trajectory for a prompt ``c``
from an unlabeled pool: ``g = D(x, c) - D(x, "")``, the redirector gives ``R(g)`` and the HED ``e``;
the soft score ``w = sigmoid((e - threshold) / temperature)`` says how harmful the sample looks. The
LoRA is trained so that ``D_lora(x, c) -> D(x, c) + w * (R(g) - g)``: for harmful-looking samples
plain CFG then gives SafeCFG's ``D_u + cfg * R(g)``, for clean ones the target is the base
prediction itself (the preservation term). Every target above assumes the empty prompt's prediction
``D_u`` is the base model's, but the LoRA is in the model for both branches of CFG, and a drift of the
unconditional prediction reaches every image multiplied by ``cfg - 1``. So each state also keeps the base
``D(x, "")`` as a target for the empty prompt (``target_u``, weight ``uncond_weight``): the second
preservation term. The supervised baseline (``supervised_targets``) uses
the true labels instead, with ESD's negative-guidance target for harmful prompts.

With the paper's text HGR (:func:`text_targets`) the redirection is SafeCFG's own guided output:
``D_h = D(x, HGR(c))`` replaces the empty prompt's prediction, and the LoRA learns
``D_lora(x, c) -> D_c + w * (1 - 1/cfg) * (D_u - D_h)``, under which plain CFG at ``cfg`` gives
``D_h + cfg * (D_c - D_h)`` where ``w = 1``. Its trajectories are SafeCFG's (the text HGR as the
unconditional branch): the states the fine-tuned model itself passes through.

The LoRA itself (modules, files, the training loop, resumable state) is :mod:`safecfg.lora`; the command line is
``python -m commands.safe_finetune``. Plain torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .teacher_cache import digest

log = logging.getLogger("SafeCFG")


@dataclass
class FinetuneSpec:
    rank: int = 8
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    threshold: float = 0.5       # HED at which the soft score is 0.5 (the detector's threshold)
    temperature: float = 0.05    # width of the soft score's ramp
    states_per_trajectory: int = 5
    traj_steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    hgr_strength: float = 1.0    # how far the targets redirect, as the guider's strength (1 = as trained)
    uncond_weight: float = 1.0   # weight of the empty prompt's preservation term (0: the empty prompt is not trained)

    def to_dict(self) -> dict:
        return asdict(self)


DATA_FIELDS = ("threshold", "temperature", "states_per_trajectory", "traj_steps", "cfg", "seed", "hgr_strength")


def redirector_fingerprint(redirector) -> str:
    """What a redirector computes: its weights' bytes (learned HGR) or its settings."""
    if redirector is None:
        return "none"
    net = getattr(redirector, "net", None)
    h = hashlib.sha256(type(redirector).__name__.encode())
    if isinstance(net, nn.Module):
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    else:
        h.update(json.dumps({k: v for k, v in vars(redirector).items() if isinstance(v, (int, float, str, bool))},
                            sort_keys=True).encode())
    return h.hexdigest()[:32]


def data_fingerprint(spec: FinetuneSpec, prompts: list[str], labels, image_size: int, redirector) -> str:
    """Identifies the teacher data: a cached copy made for other prompts, labels, size, settings or
    another redirector (a recalibrated threshold included) is rebuilt, never reused."""
    return digest({"format": 2, "spec": {k: getattr(spec, k) for k in DATA_FIELDS}, "prompts": list(prompts),
                    "labels": None if labels is None else [bool(v) for v in labels], "image_size": image_size,
                    "redirector": redirector_fingerprint(redirector)})


def lora_fingerprint(data_fp: str, spec: FinetuneSpec) -> str:
    """Identifies a LoRA run up to its length: resuming with more steps is allowed, anything else restarts."""
    return digest({"data": data_fp, "spec": {k: v for k, v in spec.to_dict().items() if k != "steps"}})


def soft_score(e: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    return torch.sigmoid((e.float() - threshold) / max(1e-6, temperature))


def unsupervised_targets(redirector, d_c: torch.Tensor, d_u: torch.Tensor, sigma: torch.Tensor,
                         threshold: float, temperature: float, strength: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``D_c + w * strength * (R(g) - g)`` and the soft scores ``w``, from the redirector alone."""
    g = d_c - d_u
    red = redirector.redirect(g, sigma, uncond=d_u)
    w = soft_score(red.hed, threshold, temperature)
    return d_c + (w * float(strength)).view(-1, *([1] * (g.ndim - 1))) * (red.g_red - g), w


def text_targets(d_c: torch.Tensor, d_u: torch.Tensor, d_h: torch.Tensor, threshold: float, temperature: float,
                 cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A text HGR's targets ``D_c + w * (1 - 1/cfg) * (D_u - D_h)`` and soft scores ``w``: ``D_h`` is
    ``D(x, HGR(c))``; ``w`` comes from the harmful Euclidean distance on the scores,
    ``||D_u - D_h|| / ||D_c - D_u||`` (the detector's measure with the prompt). Where ``w = 1``, plain
    CFG at ``cfg`` on the target gives SafeCFG's ``D_h + cfg * (D_c - D_h)``."""
    from .redirect import hed

    if cfg <= 1.0:
        raise ValueError(f"a text HGR's fine-tune targets need a guidance scale above 1, got {cfg}")
    g = d_c - d_u
    w = soft_score(hed(g, d_c - d_h), threshold, temperature)
    return d_c + w.view(-1, *([1] * (g.ndim - 1))) * (1.0 - 1.0 / cfg) * (d_u - d_h), w


def supervised_targets(d_c: torch.Tensor, d_u: torch.Tensor, harmful: torch.Tensor, eta: float = 1.0):
    """ESD-style labelled targets: harmful prompts ``D_u - eta * (D_c - D_u)``, clean ones ``D_c``."""
    h = harmful.bool().view(-1, *([1] * (d_c.ndim - 1)))
    return torch.where(h, d_u - eta * (d_c - d_u), d_c)


def build_data(teacher, prompts: list[str], targets_fn: Callable, spec: FinetuneSpec, *, batch: int = 32,
               negatives_fn: Callable | None = None, progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """States of the base model's plain-CFG trajectories and their targets.

    ``targets_fn(d_c, d_u, sigma, rows, x) -> (target, score)``; ``rows`` are prompt indices.
    ``negatives_fn(texts)``: the unconditional branch's text embeddings for the trajectories (a text
    HGR's; default the empty prompt's). Returns ``x, sigma, prompt (index), target, score`` and
    ``target_u`` (the base model's ``D(x, "")``, the empty prompt's preservation target), float32, CPU."""
    rec: dict[str, list] = {k: [] for k in ("x", "sigma", "prompt", "target", "score", "target_u")}
    units = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    rng = random.Random(spec.seed)
    for u, rows in enumerate(units):
        if should_stop is not None and should_stop():
            raise InterruptedError("safe fine-tuning stopped")
        texts = [prompts[i] for i in rows]
        states, _ = teacher.trajectories(texts, spec.seed * 1_000_003 + u, spec.traj_steps, spec.cfg,
                                         negatives=negatives_fn(texts) if negatives_fn is not None else None)
        picks = sorted(rng.sample(range(len(states)), min(spec.states_per_trajectory, len(states))))
        for k in picks:
            x, sigma = states[k]
            d_c, d_u = teacher.denoise(x, sigma, [texts, [""] * len(texts)])
            target, score = targets_fn(d_c, d_u, sigma, torch.tensor(rows), x)
            rec["x"].append(x.float())
            rec["sigma"].append(sigma.float())
            rec["prompt"].append(torch.tensor(rows))
            rec["target"].append(target.float().cpu())
            rec["score"].append(score.float().cpu())
            rec["target_u"].append(d_u.float().cpu())
        if progress is not None:
            progress(u + 1, len(units))
    return {k: torch.cat(v) for k, v in rec.items()}
