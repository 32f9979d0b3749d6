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


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """``--toy`` (the bundled toy-world model) or ``--checkpoint`` (a user's checkpoint file)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--toy", action="store_true", help="the bundled toy-world model")
    src.add_argument("--checkpoint", help="a checkpoint file with a text encoder (SD1.x/SDXL family)")


def load_model(args: argparse.Namespace):
    """(MODEL, CLIP, base model name) for ``--toy`` or ``--checkpoint``; a checkpoint without a text
    encoder is refused."""
    if args.toy:
        from toyworld.models import load_clip, load_unet

        return load_unet(), load_clip(), "toyworld"
    import comfy.sd

    mp, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
    if clip is None:
        raise SystemExit(f"{args.checkpoint}: no text encoder in the checkpoint; it is needed here")
    return mp, clip, Path(args.checkpoint).name
