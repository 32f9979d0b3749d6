"""The HGR's teacher cache: what the base model does on its own trajectories, stored once. Plain torch.

The base model enters only through a :class:`Teacher` (``nodes/teacher.py`` implements it for a
ComfyUI MODEL + CLIP), so the cache is testable on tensors alone. For each prompt: states ``x`` on
the base model's own plain-CFG trajectories and noised versions of its final images; at each state
the teacher gives ``D(x, p)``, ``D(x, S(p))`` and ``D(x, "")``; stored as .safetensors shards
(resumable; ``shard``/``num_shards`` split the work across processes or GPUs). Each shard carries a
fingerprint of its prompts, settings and model, so a shard made for anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from .prompts import PromptData

log = logging.getLogger("SafeCFG")


class Teacher(Protocol):
    """The base model, as the trainer sees it."""

    latent_channels: int

    def trajectories(self, prompts: list[str], seed: int, steps: int, cfg: float) -> tuple[list, torch.Tensor]:
        """Plain-CFG sampling of ``prompts``: the states ``[(x (B,C,H,W), sigma (B,)), ...]`` at every
        step and the final latents (B,C,H,W); (B,C,T,H,W) clips for a video model."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[list[str]]) -> list[torch.Tensor]:
        """``D(x, prompt)`` for every column of ``prompts`` (each a list of B prompts), in one batch."""

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the model's schedule."""


@dataclass
class CacheSpec:
    states_per_trajectory: int = 4
    noised_per_image: int = 2
    steps: int = 20
    cfg: float = 5.0
    batch: int = 32
    seed: int = 0


KEYS = ("g", "target", "uncond", "sigma", "harmful", "category")


def build_cache(teacher: Teacher, data: PromptData, out_dir: str | os.PathLike, spec: CacheSpec, *,
                shard: int = 0, num_shards: int = 1, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """Write the teacher cache as shards ``cache-XXXXX.safetensors``; existing shards are kept (resume).

    Work unit = one batch of prompts (harmful and clean interleaved); unit ``i`` belongs to process
    ``shard`` when ``i % num_shards == shard``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [(h, s, data.category_names.index(c) + 1) for h, s, c in zip(data.harmful, data.safe, data.categories)]
    items += [(c, c, 0) for c in data.clean]
    rng = random.Random(spec.seed)
    rng.shuffle(items)
    units = [items[i:i + spec.batch] for i in range(0, len(items), spec.batch)]
    lo, hi = teacher.sigma_range()
    model_fp = teacher.fingerprint() if hasattr(teacher, "fingerprint") else ""
    paths = []
    for u, unit in enumerate(units):
        if u % num_shards != shard:
            continue
        path = out / f"cache-{u:05d}.safetensors"
        paths.append(path)
        if progress:
            progress(u, len(units))
        unit_fp = digest({"spec": spec.__dict__, "unit": unit, "model": model_fp})
        if path.is_file():
            if cache_metadata(path).get("unit") == unit_fp:
                continue
            log.info("[SafeCFG] %s was made for other prompts, settings or model; rebuilding it", path)
        if should_stop and should_stop():
            raise InterruptedError("cache building was cancelled; run again to resume")
        prompts = [p for p, _, _ in unit]
        safes = [s for _, s, _ in unit]
        cats = torch.tensor([c for _, _, c in unit])
        gen = torch.Generator().manual_seed(spec.seed * 100_003 + u)
        states, finals = teacher.trajectories(prompts, spec.seed * 100_003 + u, spec.steps, spec.cfg)
        picks = sorted(torch.randperm(len(states), generator=gen)[:spec.states_per_trajectory].tolist())
        xs = [states[i] for i in picks]
        for _ in range(spec.noised_per_image):  # finished images, noised: detection on any image
            s = torch.exp(torch.empty(len(prompts)).uniform_(math.log(lo), math.log(hi), generator=gen))
            xs.append((finals + torch.randn(finals.shape, generator=gen) * s.view(-1, *[1] * (finals.ndim - 1)), s))
        rec = {k: [] for k in KEYS}
        for x, sigma in xs:
            d_p, d_s, d_u = teacher.denoise(x, sigma, [prompts, safes, [""] * len(prompts)])
            rec["g"].append((d_p - d_u).float())
            rec["target"].append((d_s - d_u).float())
            rec["uncond"].append(d_u.float())
            rec["sigma"].append(sigma.float().flatten())
            rec["harmful"].append((cats > 0).to(torch.uint8))
            rec["category"].append(cats.to(torch.int32))
        tensors = {k: torch.cat(v).contiguous() for k, v in rec.items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"spec": json.dumps(spec.__dict__, default=str), "unit": unit_fp})
        os.replace(tmp, path)
    if progress:
        progress(len(units), len(units))
    return paths


def digest(obj) -> str:
    """A short stable hash of a JSON-able description (cache fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_metadata(path: str | os.PathLike) -> dict:
    """A cache file's safetensors metadata; ``{}`` for a truncated or foreign file (which is rebuilt)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def load_cache(cache_dir: str | os.PathLike, paths: list[Path] | None = None) -> dict[str, torch.Tensor]:
    """The cache's shards concatenated: ``paths`` (what :func:`build_cache` returned), else every shard
    in ``cache_dir``."""
    paths = sorted(paths) if paths is not None else sorted(Path(cache_dir).glob("cache-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no cache shards in {cache_dir}; build the cache first")
    parts = [load_file(str(p)) for p in paths]
    out = {k: torch.cat([p[k] for p in parts]) for k in KEYS}
    if out["g"].ndim == 5:  # video clips (N, C, T, h, w): the HGR acts frame by frame, so it trains on frames
        n, t = out["g"].shape[0], out["g"].shape[2]
        for k in ("g", "target", "uncond"):
            out[k] = out[k].permute(0, 2, 1, 3, 4).reshape(n * t, *out[k].shape[1:2], *out[k].shape[3:])
        for k in ("sigma", "harmful", "category"):
            out[k] = out[k].repeat_interleave(t)
        out["latent_frames"] = torch.tensor(t)
    return out
