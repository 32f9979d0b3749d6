"""Shared training plumbing for the toy world: ComfyUI start-up, resumable safetensors state, logging.

Training state (model, optimiser moments, step, RNG seeds) is saved as .safetensors every few
minutes and on exit, so a killed job resumes where it stopped with ``--resume`` (the default).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("SafeCFG.toyworld")


def setup_comfy(cpu: bool | None = None) -> Path:
    """ComfyUI in library mode for toy-world training (``devtools.comfy.start``: the automatic device
    unless ``cpu``, PyTorch's SDPA attention, no nodes needed)."""
    from devtools import comfy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return comfy.start(cpu=True if cpu else None, pytorch_attention=True, nodes=False)
    except comfy.ComfyRuntimeError as e:
        raise SystemExit(str(e)) from None


def save_state(path: str | os.PathLike, modules: dict, opt, step: int, meta: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
    if opt is not None:
        st = opt.state_dict()
        for i, s in st["state"].items():
            for k, v in s.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
        meta = dict(meta or {}, opt_groups=json.dumps(st["param_groups"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), **{k: str(v) for k, v in (meta or {}).items()}})
    os.replace(tmp, path)


def load_state(path: str | os.PathLike, modules: dict, opt) -> int:
    """Restore a state written by :func:`save_state`; returns the step (0 when there is none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        pre = f"model.{name}."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    if opt is not None and "opt_groups" in meta:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        groups = json.loads(meta["opt_groups"])
        opt.load_state_dict({"state": state, "param_groups": groups})
    return int(meta.get("step", 0))


class Every:
    """True once every ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def init_module_(module, seed: int) -> None:
    """Standard PyTorch initialisation for modules built with ComfyUI's no-init ops."""
    import torch

    torch.manual_seed(seed)
    for m in module.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
