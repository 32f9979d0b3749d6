"""What the command lines share: device options, ComfyUI start-up and progress bars."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cpu", action="store_true",
                    help="run on the CPU even where CUDA is available (default: ComfyUI's automatic device)")


def start(args: argparse.Namespace) -> Path:
    """ComfyUI in library mode with this pack loaded as ``safecfg_pack``; PyTorch's SDPA attention
    (exact, and several times faster than sub-quadratic attention on the CPU for training)."""
    from devtools import comfy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        comfy.start(cpu=True if args.cpu else None, pytorch_attention=True)
    except comfy.ComfyRuntimeError as e:
        raise SystemExit(str(e)) from None
    if not comfy.pack_loaded():
        raise SystemExit(f"the SafeCFG pack failed to load in ComfyUI:\n{comfy.pack_error()}")
    return REPO


def progress_bars():
    """``progress(stage, done, total)`` drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars: dict = {}

    def progress(stage, done, total):
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, dynamic_ncols=True))
        bar.n = done
        bar.refresh()

    return progress
