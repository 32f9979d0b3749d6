"""Toy-world weight files (.safetensors with JSON-able metadata), written atomically. No ComfyUI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_weights(path: str | os.PathLike, sd: dict, meta: dict, half: bool = True) -> None:
    """Atomic safetensors write (fp16 storage keeps the bundle small)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).contiguous()
           for k, v in sd.items()}
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()})
    os.replace(tmp, path)


def read_meta(path: str | os.PathLike) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def load_sd(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy-world weight file '{path}' is missing; run `make toy-train` to rebuild it")
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
