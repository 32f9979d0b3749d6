"""Training from the graph: an HGR for the MODEL and CLIP in the graph, written into models/hgr/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..safecfg.hgr_file import load_hgr, save_hgr, stamp_trained_for
from ..safecfg.hgr_net import HGRConfig
from ..safecfg.prompts import PromptData
from ..safecfg.teacher_cache import CacheSpec
from ..safecfg.text_train import RewriteSpec, TextFitSpec, TextStatesSpec, add_rewriter, train_text_hgr
from ..safecfg.train import FitSpec, train_hgr
from .hgr_nodes import FOLDER
from .hgr_type import HGRType, handle_for, model_fingerprint, state_dir
from .teacher import ComfyTeacher, swap_inference_params

CATEGORY = "SafeCFG"
PACK_DATA = Path(__file__).resolve().parents[1] / "data"


class HGRTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRTrain",
            display_name="Train HGR",
            category=CATEGORY,
            description=("Trains a Harmful Guidance Redirector for the model in the graph from harmful/safe "
                         "prompt pairs, and saves it in models/hgr/. The expensive part (the model's own "
                         "guidance) is cached in ComfyUI's user folder (user/safecfg/hgr_cache/<name>), so a cancelled "
                         "run resumes."),
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the HGR will drive."),
                io.Clip.Input("clip", tooltip="Its text encoder (encodes the training prompts)."),
                io.String.Input("data", default="toyworld_hgr.json",
                                tooltip="Prompt-pair JSON: a file in the pack's data/ folder or an absolute path. "
                                        "Format: {\"pairs\": [{\"harmful\", \"safe\", \"category\"}], "
                                        "\"clean\": [...]}."),
                io.String.Input("filename", default="my_hgr",
                                tooltip="Name of the HGR file written to models/hgr/ (.safetensors is added)."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64,
                             tooltip="Image side for the teacher trajectories; the model's native size "
                                     "(512 SD1.5, 1024 SDXL, 64 toy world)."),
                io.Int.Input("fit_steps", default=3000, min=10, max=100000,
                             tooltip="Optimiser steps for fitting (early stopping may end sooner). 2000-5000."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed for trajectories and fitting."),
                io.Combo.Input("kind", options=["latent", "text"], default="latent", optional=True,
                               tooltip="latent: a network on the CFG direction in latent space. text: the paper's "
                                       "form, a Transformer over the prompt's text embedding whose output replaces "
                                       "the empty prompt in CFG's unconditional branch (computed once per prompt, "
                                       "free per step; also usable through HGR Text Negative with a stock "
                                       "KSampler)."),
                io.Int.Input("rewrite_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="text kind only: after the fit, this many steps of a rewriter of the prompt's "
                                     "own embedding towards its safe rewrite's (gated by the HGR's harm distance, "
                                     "so a prompt it reads as clean keeps its embedding exactly). On embeddings "
                                     "only, no denoiser: fast. 0 = none; 1000-1500 typical."),
                io.Int.Input("frames", default=3, min=1, max=64, optional=True,
                             tooltip="video models only (Wan and others): latent frames of each teacher clip "
                                     "(Wan: 3 latent frames = 9 video frames). The latent HGR works frame by "
                                     "frame, so it then drives clips of any length; more frames cost more per "
                                     "teacher clip. Ignored for image models."),
            ],
            outputs=[HGRType.Output(display_name="HGR", tooltip="The trained HGR, ready for the guider or patch.")],
        )

    @classmethod
    def execute(cls, model, clip, data, filename, image_size, fit_steps, seed, kind="latent",
                rewrite_steps=0, frames=3) -> io.NodeOutput:
        path = Path(data) if os.path.isabs(data) else PACK_DATA / data
        try:
            prompts = PromptData.load(path)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"HGRTrain: cannot read prompt data '{path}': {e}. Give a JSON file in the pack's "
                             "data/ folder or an absolute path.") from None
        name = Path(filename).name.removesuffix(".safetensors")
        if not name or name.startswith("."):
            raise ValueError(f"HGRTrain: invalid filename {filename!r}; use a plain name such as 'my_hgr'.")
        out_dir = Path(folder_paths.get_folder_paths(FOLDER)[0])
        out = out_dir / f"{name}.safetensors"
        cache_dir = Path(state_dir("hgr_cache", name))
        trained_for = model_fingerprint(model)
        teacher = ComfyTeacher(model, clip, width=image_size, height=image_size, frames=frames)
        bar = comfy.utils.ProgressBar(100)

        def progress(stage, done, total):
            frac = done / max(1, total)
            bar.update_absolute(int(70 * frac) if stage in ("cache", "teacher states") else 70 + int(30 * frac), 100)

        def should_stop():
            comfy.model_management.throw_exception_if_processing_interrupted()
            return False

        if kind == "text":
            with torch.inference_mode(False):
                # gradients pass through the frozen denoiser to the HGR: plain copies of inference weights
                swapped = swap_inference_params(model.model)
                try:
                    hgr, summary = train_text_hgr(
                        teacher, prompts, cache_dir, out, base_model=type(model.model).__name__,
                        family=type(model.model.model_config).__name__, spec=TextStatesSpec(seed=seed),
                        fit_spec=TextFitSpec(steps=fit_steps, seed=seed), progress=progress,
                        should_stop=should_stop, notes={"data": path.name}, layout=teacher.layout())
                finally:
                    for module, pname, original in swapped:
                        module._parameters[pname] = original
            note = ""
            if rewrite_steps > 0:
                hgr, r = add_rewriter(hgr, teacher.embed, prompts, RewriteSpec(steps=rewrite_steps, seed=seed),
                                      should_stop=should_stop,
                                      progress=lambda s, t, loss: bar.update_absolute(95 + int(5 * s / t), 100))
                summary["rewriter"] = r
                save_hgr(out, hgr, base_model=type(model.model).__name__, training=summary)
                load_hgr(out)
                note = f"; rewriter {r['steps']} steps, validation loss {r['val_loss']:.4f} (identity " \
                       f"{r['identity_val_loss']:.4f})"
            hgr = _stamped(out, hgr, trained_for)
            return io.NodeOutput(handle_for(hgr, out.name), ui={"text": [
                f"saved {out} (text HGR, {summary['steps']} steps, validation loss {summary['val_loss']:.4f}, "
                f"identity {summary['identity_val_loss']:.4f}{note})"]})
        if rewrite_steps:
            raise ValueError(f"HGRTrain: rewrite_steps ({rewrite_steps}) is for kind 'text' only; set it to 0 for a "
                             "latent HGR.")
        if kind != "latent":
            raise ValueError(f"HGRTrain: unknown kind {kind!r}; use 'latent' or 'text'.")
        hgr, summary = train_hgr(teacher, prompts, cache_dir, out,
                                 base_model=type(model.model).__name__, progress=progress, should_stop=should_stop,
                                 cache_spec=CacheSpec(seed=seed), fit_spec=FitSpec(steps=fit_steps, seed=seed),
                                 config=HGRConfig(latent_channels=teacher.latent_channels),
                                 device=comfy.model_management.get_torch_device())
        hgr = _stamped(out, hgr, trained_for)
        return io.NodeOutput(handle_for(hgr, out.name), ui={"text": [
            f"saved {out} ({summary['steps']} steps, best validation loss {summary['best_val']:.4f})"]})


def _stamped(out: Path, hgr, trained_for: dict | None):
    """Record in the written file (and on the returned HGR) the model it was trained for."""
    if trained_for:
        stamp_trained_for(out, trained_for)
        hgr.trained_for = trained_for
    return hgr
