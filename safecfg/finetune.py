"""Unsupervised safe fine-tuning: a LoRA on the UNet that bakes the HGR's redirection into the
model's conditional prediction, weighted by the HGR's own harmfulness score (HED). No labels.

For a state ``x`` at noise ``sigma`` of the base model's own plain-CFG trajectory for a prompt ``c``
from an unlabeled pool: ``g = D(x, c) - D(x, "")``, the redirector gives ``R(g)`` and the HED ``e``;
the soft score ``w = sigmoid((e - threshold) / temperature)`` says how harmful the sample looks. The
LoRA is trained so that ``D_lora(x, c) -> D(x, c) + w * (R(g) - g)``: for harmful-looking samples
plain CFG then gives SafeCFG's ``D_u + cfg * R(g)``, for clean ones the target is the base
prediction itself (the preservation term). The supervised baseline (``supervised_targets``) uses
the true labels instead, with ESD's negative-guidance target for harmful prompts.

LoRA files use the kohya/ComfyUI key format (``lora_unet_<module path with _>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), which ComfyUI's own LoRA loaders read. Plain torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .train import digest

log = logging.getLogger("SafeCFG")

DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * up(down(x))``; ``up`` starts at zero (the base model exactly)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        g = torch.Generator().manual_seed(seed)
        w = base.weight
        self.down = nn.Parameter(torch.randn(rank, w.shape[1], generator=g, dtype=torch.float32)
                                 / math.sqrt(w.shape[1]))
        self.up = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=torch.float32))

    def forward(self, x):
        y = self.base(x)
        d = (x.to(self.down.dtype) @ self.down.t()) @ self.up.t()
        return y + (d * (self.alpha / self.rank)).to(y.dtype)


def inject_lora(root: nn.Module, *, rank: int = 8, alpha: float | None = None,
                targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every ``nn.Linear`` of ``root`` whose path ends with one of ``targets``; returns path -> LoRA."""
    found = [(name, m) for name, m in root.named_modules()
             if isinstance(m, nn.Linear) and any(name.endswith(t) for t in targets)]
    if not found:
        raise ValueError(f"no Linear module matches the LoRA targets {targets}")
    loras = {}
    for i, (name, m) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        lora = LoRALinear(m, rank, alpha if alpha is not None else float(rank), seed=seed * 100_003 + i)
        lora.to(m.weight.device)
        setattr(parent, child, lora)
        loras[name] = lora
    return loras


def remove_lora(root: nn.Module, loras: dict[str, LoRALinear]) -> None:
    """Put the original modules back."""
    for name, lora in loras.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, lora.base)


def lora_state_dict(loras: dict[str, LoRALinear], prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """Kohya/ComfyUI LoRA keys for the UNet's ``diffusion_model`` module paths."""
    out = {}
    for name, lora in loras.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = lora.down.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = lora.up.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    return out


def save_lora(path: str | os.PathLike, loras: dict[str, LoRALinear], metadata: dict | None = None) -> Path:
    """Write a LoRA ``.safetensors`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are .safetensors; got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(lora_state_dict(loras), tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------
# targets


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

    def to_dict(self) -> dict:
        return asdict(self)


DATA_FIELDS = ("threshold", "temperature", "states_per_trajectory", "traj_steps", "cfg", "seed")


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
    return digest({"spec": {k: getattr(spec, k) for k in DATA_FIELDS}, "prompts": list(prompts),
                    "labels": None if labels is None else [bool(v) for v in labels], "image_size": image_size,
                    "redirector": redirector_fingerprint(redirector)})


def lora_fingerprint(data_fp: str, spec: FinetuneSpec) -> str:
    """Identifies a LoRA run up to its length: resuming with more steps is allowed, anything else restarts."""
    return digest({"data": data_fp, "spec": {k: v for k, v in spec.to_dict().items() if k != "steps"}})


def soft_score(e: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    return torch.sigmoid((e.float() - threshold) / max(1e-6, temperature))


def unsupervised_targets(redirector, d_c: torch.Tensor, d_u: torch.Tensor, sigma: torch.Tensor,
                         threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``D_c + w * (R(g) - g)`` and the soft scores ``w``, from the redirector alone."""
    g = d_c - d_u
    red = redirector.redirect(g, sigma, uncond=d_u)
    w = soft_score(red.hed, threshold, temperature)
    return d_c + w.view(-1, *([1] * (g.ndim - 1))) * (red.g_red - g), w


def supervised_targets(d_c: torch.Tensor, d_u: torch.Tensor, harmful: torch.Tensor, eta: float = 1.0):
    """ESD-style labelled targets: harmful prompts ``D_u - eta * (D_c - D_u)``, clean ones ``D_c``."""
    h = harmful.bool().view(-1, *([1] * (d_c.ndim - 1)))
    return torch.where(h, d_u - eta * (d_c - d_u), d_c)


def build_data(teacher, prompts: list[str], targets_fn: Callable, spec: FinetuneSpec, *, batch: int = 32,
               progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """States of the base model's plain-CFG trajectories and their targets.

    ``targets_fn(d_c, d_u, sigma, rows) -> (target, score)``; ``rows`` are prompt indices.
    Returns ``x, sigma, prompt (index), target, score`` (float32, CPU)."""
    rec: dict[str, list] = {k: [] for k in ("x", "sigma", "prompt", "target", "score")}
    units = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    rng = random.Random(spec.seed)
    for u, rows in enumerate(units):
        if should_stop is not None and should_stop():
            raise InterruptedError("safe fine-tuning stopped")
        texts = [prompts[i] for i in rows]
        states, _ = teacher.trajectories(texts, spec.seed * 1_000_003 + u, spec.traj_steps, spec.cfg)
        picks = sorted(rng.sample(range(len(states)), min(spec.states_per_trajectory, len(states))))
        for k in picks:
            x, sigma = states[k]
            d_c, d_u = teacher.denoise(x, sigma, [texts, [""] * len(texts)])
            target, score = targets_fn(d_c, d_u, sigma, torch.tensor(rows))
            rec["x"].append(x.float())
            rec["sigma"].append(sigma.float())
            rec["prompt"].append(torch.tensor(rows))
            rec["target"].append(target.float().cpu())
            rec["score"].append(score.float().cpu())
        if progress is not None:
            progress(u + 1, len(units))
    return {k: torch.cat(v) for k, v in rec.items()}


def train_lora(predict: Callable, loras: dict[str, LoRALinear], data: dict[str, torch.Tensor],
               spec: FinetuneSpec, *, progress: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None, state_path: str | os.PathLike | None = None,
               save_every: int = 100, fingerprint: str = "") -> dict:
    """Fit the LoRA parameters: ``predict(x, sigma, prompt_rows) -> D`` (with grad) towards ``target``,
    MSE in noise space (``(D - target) / sigma``). Resumable from ``state_path`` when it was saved
    with the same ``fingerprint`` (:func:`lora_fingerprint`)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_lora(predict, loras, data, spec, progress, should_stop, state_path, save_every, fingerprint)


def _train_lora(predict, loras, data, spec, progress, should_stop, state_path, save_every,
                fingerprint: str = "") -> dict:
    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    step = 0
    if state_path is not None and Path(state_path).is_file():
        step = _load_state(state_path, loras, opt, fingerprint)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        data = {k: v.clone() for k, v in data.items()}  # plain tensors (inputs may be inference tensors)
        n = data["x"].shape[0]
        for p in params:
            p.requires_grad_(True)
        while step < spec.steps:
            if should_stop is not None and should_stop():
                if state_path is not None:
                    _save_state(state_path, loras, opt, step, fingerprint)
                raise InterruptedError("safe fine-tuning stopped")
            g = torch.Generator().manual_seed(spec.seed * 7_919 + step)
            idx = torch.randint(0, n, (min(spec.batch, n),), generator=g)
            x, s, rows, t = data["x"][idx], data["sigma"][idx], data["prompt"][idx], data["target"][idx]
            lr = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
            for grp in opt.param_groups:
                grp["lr"] = lr
            d = predict(x.clone(), s, rows)
            sv = s.view(-1, *([1] * (x.ndim - 1))).to(d.device)
            loss = (((d.float() - t.to(d.device)) / sv) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, spec.steps, losses[-1])
            if state_path is not None and step % save_every == 0:
                _save_state(state_path, loras, opt, step, fingerprint)
    if state_path is not None:
        _save_state(state_path, loras, opt, step, fingerprint)
    tail = losses[-50:] or [float("nan")]
    return {"steps": step, "final_loss": sum(tail) / len(tail)}


def _save_state(path, loras, opt, step, fingerprint: str = ""):
    from safetensors.torch import save_file

    tensors = lora_state_dict(loras)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "fingerprint": fingerprint})
    os.replace(tmp, path)


def _load_state(path, loras, opt, fingerprint: str = "") -> int:
    """Resume from ``path``; a state saved for other data or settings is ignored (returns 0)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint", "") != fingerprint:
            log.info("[SafeCFG] %s was saved for other data or settings; training from the start", path)
            return 0
        step = int(meta.get("step", 0))
        t = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for name, lora in loras.items():
            key = "lora_unet_" + name.replace(".", "_")
            lora.down.copy_(t[f"{key}.lora_down.weight"])
            lora.up.copy_(t[f"{key}.lora_up.weight"])
    st = opt.state_dict()
    params = st["param_groups"][0]["params"]
    state = {}
    for i in params:
        if f"opt.{i}.exp_avg" in t:
            state[i] = {"step": torch.tensor(float(step)), "exp_avg": t[f"opt.{i}.exp_avg"],
                        "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"]}
    opt.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    return step


def main(argv=None) -> int:
    """``python -m safecfg.finetune --toy --out lora.safetensors [--supervised]`` (or ``--checkpoint``)."""
    import argparse
    import importlib
    import importlib.util
    import json

    ap = argparse.ArgumentParser(description="Unsupervised safe fine-tuning: an HED-scored LoRA.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--toy", action="store_true", help="the bundled toy-world model")
    src.add_argument("--checkpoint", help="a checkpoint file with a text encoder (SD1.x/SDXL family)")
    ap.add_argument("--hgr", default=None, help="learned HGR file (default for --toy: the bundled toy HGR)")
    ap.add_argument("--prompts", default=None, help="prompt pool (.json pair file or .txt); labels are not read")
    ap.add_argument("--supervised", action="store_true",
                    help="the ESD-style baseline that uses the true labels instead of the HGR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--states", type=int, default=5, help="states per trajectory")
    ap.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts of the (shuffled) pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", default=None, help="resumable state folder (default: .toytrain/<out>.state for "
                                                  "--toy, else next to --out)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from .train import cli_setup

    repo = cli_setup()
    fn = importlib.import_module("safecfg_pack.nodes.finetune_nodes")
    hgr_file = importlib.import_module("safecfg_pack.safecfg.hgr_file")
    train = importlib.import_module("safecfg_pack.safecfg.train")
    if args.toy:
        from toyworld.models import load_clip, load_unet

        mp, clip = load_unet(), load_clip()
        pool_path = Path(args.prompts or repo / "data" / "toyworld_hgr.json")
        hgr_path = args.hgr or repo / "weights" / "hgr" / "toyworld_hgr.safetensors"
    else:
        import comfy.sd

        mp, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
        if not args.prompts or (not args.hgr and not args.supervised):
            raise SystemExit("--prompts and --hgr are required with --checkpoint")
        pool_path, hgr_path = Path(args.prompts), args.hgr
    prompts = fn.unlabeled_prompts(pool_path)
    if args.max_prompts:
        prompts = prompts[:args.max_prompts]
    hgr = None
    labels = None
    if args.supervised:
        data = train.PromptData.load(pool_path)  # the baseline reads the labels
        harmful = set(data.harmful)
        labels = [p in harmful for p in prompts]
    else:
        hgr = hgr_file.load_hgr(hgr_path)
    spec = FinetuneSpec(rank=args.rank, steps=args.steps, states_per_trajectory=args.states, seed=args.seed,
                        threshold=(hgr.detect_threshold or 0.5) if hgr is not None else 0.5)
    bars: dict = {}

    def progress(stage, done, total):
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, dynamic_ncols=True))
        bar.n = done
        bar.refresh()

    summary = fn.run_finetune(mp, clip, prompts, Path(args.out), spec, redirector=hgr, harmful_labels=labels,
                              image_size=args.size, progress=progress,
                              state_dir=Path(args.state) if args.state else (
                                  repo / ".toytrain" / (Path(args.out).stem + ".state") if args.toy else None),
                              metadata={"base_model": "toyworld" if args.toy else Path(args.checkpoint).name})
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
