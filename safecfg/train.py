"""Training a learned HGR: prompt-pair data, the teacher cache and the fitting loop. Plain torch.

The base model enters only through a :class:`Teacher` (ComfyUI-side adapters implement it), so the
method is testable on tensors alone:

* **data**: harmful prompts with a safe rewrite (``"a red knife" -> "a red spoon"``) and clean prompts,
  as editable JSON files (``data/*.json``);
* **cache**: for each prompt, states ``x`` on the base model's own plain-CFG trajectories and noised
  versions of its final images; at each state the teacher gives ``D(x, p)``, ``D(x, S(p))`` and
  ``D(x, "")``; stored as .safetensors shards (resumable; ``shard``/``num_shards`` split the work
  across processes or GPUs);
* **fit**: ``E_h ||R(g_h) - g*||^2 / ||g*||^2 + lambda E_c ||R(g_c) - g_c||^2 / ||g_c||^2`` with a
  validation split, early stopping and seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from .hgr_net import HGRConfig, HGRNet, LearnedHGR

log = logging.getLogger("SafeCFG")


@dataclass
class PromptData:
    """Harmful prompts with their safe rewrites (and categories), and clean prompts."""

    harmful: list[str]
    safe: list[str]
    categories: list[str]
    clean: list[str]

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptData:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        pairs = d.get("pairs", [])
        bad = [p for p in pairs if not (isinstance(p, dict) and p.get("harmful") and p.get("safe"))]
        if bad or not pairs or not d.get("clean"):
            raise ValueError(f"{path}: needs 'pairs' [{{harmful, safe, category}}] and 'clean' [...]; "
                             f"{len(bad)} malformed pairs")
        return cls([p["harmful"] for p in pairs], [p["safe"] for p in pairs],
                   [p.get("category", "harmful") for p in pairs], list(d["clean"]))

    @property
    def category_names(self) -> list[str]:
        return sorted(set(self.categories))


class Teacher(Protocol):
    """The base model, as the trainer sees it."""

    latent_channels: int

    def trajectories(self, prompts: list[str], seed: int, steps: int, cfg: float) -> tuple[list, torch.Tensor]:
        """Plain-CFG sampling of ``prompts``: the states ``[(x (B,C,H,W), sigma (B,)), ...]`` at every
        step and the final latents (B,C,H,W)."""

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
    extra: dict = field(default_factory=dict)


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
            xs.append((finals + torch.randn(finals.shape, generator=gen) * s.view(-1, 1, 1, 1), s))
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
    return {k: torch.cat([p[k] for p in parts]) for k in KEYS}


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
    save_hgr(out_path, hgr, base_model=base_model, training=summary)
    load_hgr(out_path)  # what was written must load and validate
    return hgr, summary


def cli_setup() -> Path:
    """For the command lines: ComfyUI initialised in library mode (from the bootstrap or COMFYUI_DIR)
    and this pack importable as ``safecfg_pack`` (its nodes need ComfyUI). Returns the repository."""
    import importlib.util
    import sys

    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.append(str(repo))
    from toyworld.trainutil import setup_comfy

    setup_comfy()
    if "safecfg_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("safecfg_pack", repo / "__init__.py",
                                                      submodule_search_locations=[str(repo)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["safecfg_pack"] = pkg
        spec.loader.exec_module(pkg)
    return repo


def main(argv=None) -> int:
    """``python -m safecfg.train --toy`` or ``--checkpoint model.safetensors``: train an HGR from a
    repository checkout (ComfyUI from the bootstrap or COMFYUI_DIR)."""
    import argparse
    import importlib
    import importlib.util

    ap = argparse.ArgumentParser(description="Train a Harmful Guidance Redirector (HGR) for a model.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--toy", action="store_true", help="the bundled toy-world model")
    src.add_argument("--checkpoint", help="a checkpoint file with a text encoder (SD1.x/SDXL family)")
    ap.add_argument("--data", default=None, help="prompt-pair JSON (default: data/toyworld_hgr.json for --toy)")
    ap.add_argument("--out", required=True, help="the HGR .safetensors to write")
    ap.add_argument("--cache", default=None, help="teacher cache folder (default: next to --out)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels for trajectories")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of the teacher trajectories")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--fit-steps", type=int, default=3000)
    ap.add_argument("--width", type=int, default=64, help="HGR base width (64 = 2.4 M parameters)")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=1, help="split cache building across processes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    repo = cli_setup()
    from tqdm import tqdm

    teacher_mod = importlib.import_module("safecfg_pack.nodes.teacher")
    if args.toy:
        from toyworld.models import load_clip, load_unet

        mp, clip, base = load_unet(), load_clip(), "toyworld"
        data_path = args.data or repo / "data" / "toyworld_hgr.json"
    else:
        import comfy.sd

        mp, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
        if clip is None:
            raise SystemExit(f"{args.checkpoint}: no text encoder in the checkpoint; HGR training needs one")
        base = Path(args.checkpoint).name
        if not args.data:
            raise SystemExit("--data is required with --checkpoint (see data/ for the format)")
        data_path = args.data
    teacher = teacher_mod.ComfyTeacher(mp, clip, width=args.size, height=args.size)
    data = PromptData.load(data_path)
    out = Path(args.out)
    cache_dir = Path(args.cache) if args.cache else out.with_suffix(".cache")
    bars: dict[str, tqdm] = {}

    def progress(stage, done, total):
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, dynamic_ncols=True))
        bar.n = done
        bar.refresh()

    if args.num_shards > 1:
        build_cache(teacher, data, cache_dir, CacheSpec(steps=args.steps, cfg=args.cfg, seed=args.seed),
                    shard=args.shard, num_shards=args.num_shards, progress=lambda d, t: progress("cache", d, t))
        print(f"shard {args.shard}/{args.num_shards} of the cache done; run without --num-shards to fit")
        return 0
    _, summary = train_hgr(teacher, data, cache_dir, out, base_model=base, progress=progress,
                           cache_spec=CacheSpec(steps=args.steps, cfg=args.cfg, seed=args.seed),
                           fit_spec=FitSpec(steps=args.fit_steps, seed=args.seed),
                           config=HGRConfig(latent_channels=teacher.latent_channels, width=args.width))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
