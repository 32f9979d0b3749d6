"""LoRA on a torch module: injection, removal, ComfyUI-format files, the training loop and its
resumable state. Plain torch. What the LoRA is trained towards is :mod:`safecfg.finetune`'s business.

LoRA files use the kohya/ComfyUI key format (``lora_unet_<module path with _>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), which ComfyUI's own LoRA loaders read.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger("SafeCFG")

DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
#: where the UNet's attention names are not found (the flow-matching transformers: Flux's ``img_attn.qkv``,
#: SD3's ``attn.qkv``, Wan's ``self_attn.q`` / ``cross_attn.k``, Lumina's ``attention.qkv``, ...): every
#: Linear inside a module whose name holds one of these
ATTENTION_WORDS = ("attn", "attention")


def attention_linears(root: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """The paths of the Linear layers a LoRA goes on: those ending in ``targets`` (the UNet families'
    attention projections), else every Linear inside an attention module (:data:`ATTENTION_WORDS`)."""
    linears = [name for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linears if any(n.endswith(t) for t in targets)]
    if found:
        return found
    return [n for n in linears if any(w in part for part in n.split(".")[:-1] for w in ATTENTION_WORDS)]


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
    """Wrap the attention ``nn.Linear`` layers of ``root`` (:func:`attention_linears`: those whose path ends
    with one of ``targets``, else every Linear inside an attention module); returns path -> LoRA."""
    names = set(attention_linears(root, targets))
    found = [(name, m) for name, m in root.named_modules() if name in names]
    if not found:
        raise ValueError(f"no Linear module matches the LoRA targets {targets} and no attention module holds one")
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


def train_lora(predict: Callable, loras: dict[str, LoRALinear], data: dict[str, torch.Tensor],
               spec, *, progress: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None, state_path: str | os.PathLike | None = None,
               save_every: int = 100, fingerprint: str = "") -> dict:
    """Fit the LoRA parameters: ``predict(x, sigma, prompt_rows) -> D`` (with grad) towards ``target``
    (``spec``: ``steps``, ``batch``, ``lr``, ``seed``, ``uncond_weight``, e.g. a
    :class:`safecfg.finetune.FinetuneSpec`), MSE in noise space (``(D - target) / sigma``). With
    ``uncond_weight > 0`` each step also fits half a batch of the same states with the empty prompt (row
    ``-1``) to ``target_u``, weighted so: the unconditional branch stays the base model's. Resumable from
    ``state_path`` when it was saved with the same ``fingerprint`` (:func:`safecfg.finetune.lora_fingerprint`)."""
    # a denoiser that adds in place to tensors autograd saved (ComfyUI's Flux blocks) trains too: such a
    # tensor is copied on mutation
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
        return _train_lora(predict, loras, data, spec, progress, should_stop, state_path, save_every, fingerprint)


def _train_lora(predict, loras, data, spec, progress, should_stop, state_path, save_every,
                fingerprint: str = "") -> dict:
    w_u = float(getattr(spec, "uncond_weight", 0.0) or 0.0)
    if w_u > 0 and "target_u" not in data:
        raise ValueError("uncond_weight > 0 needs the teacher data's 'target_u' (the base model's D(x, \"\"))")
    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    step = 0
    if state_path is not None and Path(state_path).is_file():
        step = load_state(state_path, loras, opt, fingerprint)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        data = {k: v.clone() for k, v in data.items()}  # plain tensors (inputs may be inference tensors)
        n = data["x"].shape[0]
        for p in params:
            p.requires_grad_(True)
        while step < spec.steps:
            if should_stop is not None and should_stop():
                if state_path is not None:
                    save_state(state_path, loras, opt, step, fingerprint)
                raise InterruptedError("safe fine-tuning stopped")
            g = torch.Generator().manual_seed(spec.seed * 7_919 + step)
            idx = torch.randint(0, n, (min(spec.batch, n),), generator=g)
            x, s, rows, t = data["x"][idx], data["sigma"][idx], data["prompt"][idx], data["target"][idx]
            nb = x.shape[0]
            if w_u > 0:  # the empty prompt's preservation rows: half a batch of the same states, in the same call
                iu = idx[: max(1, nb // 2)]
                x = torch.cat([x, data["x"][iu]])
                s = torch.cat([s, data["sigma"][iu]])
                rows = torch.cat([rows, torch.full((iu.shape[0],), -1, dtype=rows.dtype)])
                t = torch.cat([t, data["target_u"][iu]])
            lr = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
            for grp in opt.param_groups:
                grp["lr"] = lr
            d = predict(x.clone(), s, rows)
            sv = s.view(-1, *([1] * (x.ndim - 1))).to(d.device)
            err = (((d.float() - t.to(d.device)) / sv) ** 2).flatten(1).mean(1)
            loss = err[:nb].mean() + (w_u * err[nb:].mean() if w_u > 0 else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, spec.steps, losses[-1])
            if state_path is not None and step % save_every == 0:
                save_state(state_path, loras, opt, step, fingerprint)
    if state_path is not None:
        save_state(state_path, loras, opt, step, fingerprint)
    tail = losses[-50:] or [float("nan")]
    return {"steps": step, "final_loss": sum(tail) / len(tail)}


def save_state(path, loras: dict[str, LoRALinear], opt, step: int, fingerprint: str = "") -> None:
    """The LoRA weights, the optimiser's moments and the step, written atomically."""
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


def load_state(path, loras: dict[str, LoRALinear], opt, fingerprint: str = "") -> int:
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
