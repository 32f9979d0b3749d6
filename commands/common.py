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
        # ComfyUI already running in this process (a host that loaded the models itself, see
        # ``main(models=...)``) is used with its own device and attention settings
        wanted = comfy.settings() or {"cpu": True if args.cpu else None, "pytorch_attention": True}
        comfy.start(**wanted)
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
    """``--toy`` (the bundled toy-world model), ``--checkpoint`` (a user's checkpoint file with its text
    encoder) or ``--diffusion-model`` with ``--text-encoder`` and ``--clip-type`` (the separate files of
    SD3.5, Flux, Chroma, Qwen-Image, Lumina 2, Z-Image, HiDream, Wan, ...; ComfyUI's diffusion-model
    and CLIP loaders read them)."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--toy", action="store_true", help="the bundled toy-world model")
    src.add_argument("--checkpoint", help="a checkpoint file with a text encoder (SD1.x/SDXL family)")
    src.add_argument("--diffusion-model",
                     help="a diffusion-model file (ComfyUI's models/diffusion_models: SD3.5, Flux, Chroma, "
                          "Qwen-Image, Lumina 2, Z-Image, HiDream, Wan, ...); needs --text-encoder and --clip-type")
    ap.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                    help="with --diffusion-model: a text encoder file (models/text_encoders); repeat it for each "
                         "file the model reads, as the Dual/Triple/QuadrupleCLIPLoader nodes take them (Flux: "
                         "clip_l and t5xxl)")
    ap.add_argument("--clip-type", default=None,
                    help="with --diffusion-model: the type the CLIP loader nodes name (sd3, flux, chroma, "
                         "qwen_image, lumina2, wan, hidream, ...)")


def check_model_args(ap: argparse.ArgumentParser, args: argparse.Namespace, loaded: bool = False) -> None:
    """Exactly one model source (unless ``loaded``: the host passed the model in), and the text encoder
    options only with ``--diffusion-model``, where both are required."""
    given = [o for o, v in (("--toy", args.toy), ("--checkpoint", args.checkpoint),
                            ("--diffusion-model", args.diffusion_model)) if v]
    if loaded:
        if given:
            ap.error(f"{given[0]}: the model was passed in by the host; give no model option")
        return
    if not given:
        ap.error("one of --toy, --checkpoint or --diffusion-model is required")
    if args.diffusion_model:
        if not args.text_encoder or not args.clip_type:
            ap.error("--diffusion-model needs --text-encoder (each text encoder file, the option repeated) and "
                     "--clip-type (sd3, flux, chroma, qwen_image, lumina2, wan, hidream, ...)")
    elif args.text_encoder or args.clip_type:
        ap.error("--text-encoder and --clip-type go with --diffusion-model (a checkpoint carries its own encoder)")


def clip_type(name: str):
    """ComfyUI's ``CLIPType`` for a lower-case name as the CLIP loader nodes list it; an unknown name
    exits naming the ones there are."""
    import comfy.sd

    types = {t.name.lower(): t for t in comfy.sd.CLIPType}
    if name.lower() not in types:
        raise SystemExit(f"--clip-type {name!r}: not a type of this ComfyUI; one of {', '.join(sorted(types))}")
    return types[name.lower()]


def load_model(args: argparse.Namespace):
    """(MODEL, CLIP, base model name) for ``--toy``, ``--checkpoint`` or ``--diffusion-model``; a
    checkpoint without a text encoder, or a file that is missing or that ComfyUI cannot read as a
    model, is refused naming it."""
    if args.toy:
        from toyworld.models import load_clip, load_unet

        return load_unet(), load_clip(), "toyworld"
    import comfy.sd

    paths = [args.checkpoint or args.diffusion_model] + list(args.text_encoder or [])
    for p in paths:
        if not Path(p).is_file():
            raise SystemExit(f"{p}: no such file")
    if args.checkpoint:
        mp, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
        if clip is None:
            raise SystemExit(f"{args.checkpoint}: no text encoder in the checkpoint; it is needed here (or give "
                             "--diffusion-model with --text-encoder and --clip-type)")
        return mp, clip, Path(args.checkpoint).name
    kind = clip_type(args.clip_type)
    try:
        mp = comfy.sd.load_diffusion_model(args.diffusion_model)
    except RuntimeError as e:
        raise SystemExit(f"{args.diffusion_model}: ComfyUI cannot read it as a diffusion model ({e})") from None
    clip = comfy.sd.load_clip(ckpt_paths=list(args.text_encoder), clip_type=kind)
    return mp, clip, Path(args.diffusion_model).name
