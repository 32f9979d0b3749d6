"""Unsupervised safe fine-tuning from the graph: `HGRSafeFinetune` writes a LoRA that ComfyUI's own
LoRA loaders apply, after which plain CFG (a stock KSampler) follows SafeCFG's redirection where the
HGR scores a sample as harmful."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..safecfg.finetune import (
    FinetuneSpec,
    build_data,
    data_fingerprint,
    lora_fingerprint,
    supervised_targets,
    text_targets,
    unsupervised_targets,
)
from ..safecfg.lora import inject_lora, remove_lora, save_lora, train_lora
from ..safecfg.teacher_cache import cache_metadata
from .hgr_type import HGRHandle, HGRType
from .hgr_type import state_dir as user_state_dir
from .teacher import ComfyTeacher, swap_inference_params

log = logging.getLogger("SafeCFG")
PACK_DIR = Path(__file__).resolve().parents[1]


def unlabeled_prompts(path: str | os.PathLike) -> list[str]:
    """The prompt strings of a pool file, nothing else: a text file with one prompt per line, a JSON list
    of strings or ``{"prompts": [...]}``; from an HGR pair file only the ``harmful`` and ``clean``
    strings (its ``safe`` rewrites and ``category`` labels are never looked up)."""
    p = Path(path)
    if p.suffix == ".json":
        d = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "prompts" in d:
            d = d["prompts"]
        if isinstance(d, list):
            prompts = d
        elif isinstance(d, dict):
            prompts = [pair.get("harmful") if isinstance(pair, dict) else None for pair in d.get("pairs", [])]
            prompts += list(d.get("clean", []))
        else:
            prompts = [None]
        if not all(isinstance(t, str) and t.strip() for t in prompts):
            raise ValueError(f"{p}: a JSON prompt pool is a list of strings, {{\"prompts\": [...]}}, or a pair file "
                             "whose pairs each have a 'harmful' string")
        prompts = [t.strip() for t in prompts]
    else:
        prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # a fixed shuffle: nothing downstream can tell harmful from clean by position
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1234)).tolist()
    return [prompts[i] for i in order]


def make_train_predict(teacher: ComfyTeacher, prompts: list[str]):
    """``predict(x, sigma, rows) -> D(x, prompts[rows])`` through ComfyUI's model call, with gradients;
    a row of ``-1`` is the empty prompt."""
    device = teacher.mp.load_device

    def predict(x, sigma, rows):
        texts = [prompts[int(i)] if int(i) >= 0 else "" for i in rows]
        return teacher.column_prediction(x.to(device), sigma.to(device), texts)

    return predict


def run_finetune(mp, clip, prompts: list[str], out_path: Path, spec: FinetuneSpec, *, redirector=None,
                 harmful_labels: list[bool] | None = None, image_size: int = 512, state_dir: Path | None = None,
                 progress=None, should_stop=None, metadata: dict | None = None) -> dict:
    """Build the teacher data (cached in ``state_dir``), fit the LoRA (resumable), write ``out_path``.

    Unsupervised (``redirector``): targets from the redirector and its HED score; a text HGR's
    (:func:`safecfg.finetune.text_targets`) from SafeCFG's own trajectories with it, at
    ``spec.hgr_strength``. Supervised baseline (``harmful_labels``): ESD-style targets from the true labels."""
    from safetensors.torch import load_file, save_file

    teacher = ComfyTeacher(mp, clip, width=image_size, height=image_size)
    state_dir = Path(state_dir) if state_dir else out_path.with_name("." + out_path.stem + ".state")
    state_dir.mkdir(parents=True, exist_ok=True)
    data_file = state_dir / "data.safetensors"
    negatives_fn = None
    if getattr(redirector, "kind", "") == "text":
        last: dict = {}

        def negatives_fn(texts):
            # HGR(c) once per batch of prompts: its trajectories and each of its picked states share it
            key = tuple(texts)
            if key not in last:
                last.clear()
                last[key] = redirector.uncond(teacher.embed(texts), spec.hgr_strength, rewritten=False)
            return last[key]

        def targets_fn(d_c, d_u, sigma, rows, x):
            with torch.no_grad():
                d_h = teacher.denoise_embedding(x, sigma, negatives_fn([prompts[int(i)] for i in rows])).cpu()
            return text_targets(d_c, d_u, d_h, spec.threshold, spec.temperature, spec.cfg)
    elif redirector is not None:
        def targets_fn(d_c, d_u, sigma, rows, x):
            with torch.no_grad():
                return unsupervised_targets(redirector, d_c, d_u, sigma, spec.threshold, spec.temperature,
                                            spec.hgr_strength)
    elif harmful_labels is not None:
        labels = torch.tensor([bool(v) for v in harmful_labels])

        def targets_fn(d_c, d_u, sigma, rows, x):
            return supervised_targets(d_c, d_u, labels[rows]), labels[rows].float()
    else:
        raise ValueError("run_finetune needs a redirector (unsupervised) or labels (supervised baseline)")
    comfy.model_management.load_models_gpu([mp])
    data_fp = data_fingerprint(spec, prompts, harmful_labels if redirector is None else None, image_size, redirector)
    lora_state = state_dir / "lora_state.safetensors"
    if data_file.is_file() and cache_metadata(data_file).get("fingerprint") == data_fp:
        data = load_file(str(data_file))
    else:
        if data_file.is_file():
            log.info("[SafeCFG] %s was made for other prompts, settings or HGR; rebuilding it", data_file)
        data = build_data(teacher, prompts, targets_fn, spec, negatives_fn=negatives_fn,
                          progress=lambda d, t: progress and progress("teacher data", d, t), should_stop=should_stop)
        tmp = data_file.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp), metadata={"fingerprint": data_fp})
        os.replace(tmp, data_file)
        lora_state.unlink(missing_ok=True)  # trained on the old data
    unet = mp.model.diffusion_model
    frozen = {n: p.requires_grad for n, p in mp.model.named_parameters()}
    mp.model.requires_grad_(False)  # only the LoRA learns
    with torch.inference_mode(False):
        # weights loaded inside ComfyUI's executor are inference tensors, which autograd cannot use:
        # train against plain copies, put the originals back afterwards
        swapped = swap_inference_params(unet)
        loras = inject_lora(unet, rank=spec.rank, seed=spec.seed)
    mp.pre_run()
    try:
        summary = train_lora(make_train_predict(teacher, prompts), loras, data, spec,
                             progress=lambda s, t, loss: progress and progress("LoRA", s, t),
                             should_stop=should_stop, state_path=lora_state,
                             fingerprint=lora_fingerprint(data_fp, spec))
        meta = {"kind": "safecfg.safe_lora", "mode": "unsupervised" if redirector is not None else "supervised",
                "spec": json.dumps(spec.to_dict()), "prompts": str(len(prompts)),
                "samples": str(int(data["x"].shape[0])), "mean_score": f"{float(data['score'].mean()):.4f}",
                "final_loss": f"{summary['final_loss']:.6f}", **(metadata or {})}
        save_lora(out_path, loras, meta)
    finally:
        remove_lora(unet, loras)
        for module, name, original in swapped:
            module._parameters[name] = original
        for n, p in mp.model.named_parameters():
            p.requires_grad_(frozen.get(n, False))
        mp.cleanup()
    return {**summary, "samples": int(data["x"].shape[0]), "mean_score": float(data["score"].mean()),
            "path": str(out_path)}


class HGRSafeFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRSafeFinetune",
            display_name="SafeCFG Safe Fine-tune (LoRA)",
            category="SafeCFG",
            description=("Fine-tunes a LoRA so that plain CFG moves towards SafeCFG, from unlabeled prompts: each "
                         "sample is weighted by the HGR's own harmfulness score. Writes ComfyUI/models/loras/"
                         "<filename>.safetensors for LoraLoaderModelOnly. Cancel keeps the progress (in ComfyUI's "
                         "user/safecfg/lora_state/<filename>); run again to resume."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to make safe."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                HGRType.Input("hgr", tooltip="The learned HGR for this model (HGRLoader or HGRTrain) that scores "
                                             "and redirects: a latent HGR, or a text HGR (the paper's form; the "
                                             "teacher trajectories are then SafeCFG's own with it). A concept "
                                             "redirector is refused: its redirection needs extra concept rows the "
                                             "LoRA cannot see."),
                io.String.Input("prompts", default="toyworld_pool.txt",
                                tooltip="Unlabeled prompt pool: a file in the pack's data/ folder or an absolute "
                                        "path (.txt, one prompt per line; or .json: a list of prompts, or a pair "
                                        "file of which only the prompt strings are read)."),
                io.String.Input("filename", default="safe_lora", tooltip="Name of the LoRA written to models/loras/."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64,
                             tooltip="Image side of the teacher trajectories: the model's native size (512 SD1.5, "
                                     "1024 SDXL, 64 toy)."),
                io.Int.Input("steps", default=1500, min=10, max=100000, tooltip="LoRA optimiser steps."),
                io.Int.Input("rank", default=8, min=1, max=128, tooltip="LoRA rank (8 is plenty for erasure)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=100.0, step=0.001,
                               tooltip="HED at which a sample counts as half harmful. 0 = the HGR's calibrated "
                                       "detection threshold (else 0.5)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of trajectories and fitting."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="How far the LoRA's targets redirect, as the SafeCFG guider's strength: 1 = "
                                       "as trained; a text HGR's calibrated strength makes the LoRA follow SafeCFG "
                                       "at that strength (the bundled toy safe LoRA was made at 1.25). A text HGR's "
                                       "targets use its paper-form branch only (its rewriter is not used)."),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The written LoRA's file name (for LoraLoaderModelOnly).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, hgr: HGRHandle, prompts, filename, image_size, steps, rank, threshold,
                seed, strength=1.0) -> io.NodeOutput:
        node = "HGRSafeFinetune"
        hgr.check_model(model, node)
        if hgr.concept_conds:
            raise ValueError(f"{node}: fine-tuning needs a learned HGR (its redirection does not depend on extra "
                             "concept rows). Load one with HGRLoader or train one with HGRTrain.")
        name = Path(filename).name.strip()
        if not name or name != filename.strip() or name.startswith("."):
            raise ValueError(f"{node}: filename {filename!r} must be a plain file name such as 'safe_lora'")
        src = Path(prompts)
        if not src.is_absolute():
            src = PACK_DIR / "data" / prompts
        if not src.is_file():
            raise ValueError(f"{node}: prompt file {prompts!r} not found (looked at {src}). Put it in the pack's "
                             "data/ folder or give an absolute path.")
        pool = unlabeled_prompts(src)
        if not pool:
            raise ValueError(f"{node}: {src} holds no prompts")
        red = hgr.redirector
        thr = threshold if threshold > 0 else (getattr(red, "detect_threshold", None) or 0.5)
        spec = FinetuneSpec(rank=rank, steps=steps, threshold=thr, seed=seed, hgr_strength=strength)
        out_dir = Path(folder_paths.get_folder_paths("loras")[0])
        out = out_dir / (name + ".safetensors")
        bar = comfy.utils.ProgressBar(100)

        def progress(stage, done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            frac = done / max(1, total)
            bar.update_absolute(int(100 * (0.3 * frac if stage == "teacher data" else 0.3 + 0.7 * frac)), 100)

        def should_stop():
            return comfy.model_management.processing_interrupted()

        try:
            summary = run_finetune(model, clip, pool, out, spec, redirector=red, image_size=image_size,
                                   state_dir=Path(user_state_dir("lora_state", name)), progress=progress,
                                   should_stop=should_stop,
                                   metadata={"hgr": hgr.name})
        except InterruptedError:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        log.info("[SafeCFG] safe fine-tune: %s", summary)
        return io.NodeOutput(out.name, ui={"text": [f"wrote {out.name}: {summary}"]})
