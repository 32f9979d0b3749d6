"""Harmfulness detection on any image (HED) and visual filtering: `HGRHarmDetector`, `HGRHarmFilter`."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy.sampler_helpers import convert_cond
from comfy_api.v0_0_2 import io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from ..safecfg.detect import ACTIONS, Detection, apply_action, detect, level_percents
from ..safecfg.text_hgr import TextHGRScorer
from .hgr_type import IMAGES_ON_VIDEO_VAE, HGRHandle, HGRType, model_family
from .sampling import text_negative

CATEGORY = "SafeCFG"
DetectionType = io.Custom("HGR_DETECTION")
# Used when the threshold is left on auto and the redirector carries no calibrated one. Not calibrated:
# a neutral fallback. `make calibrate` records a calibrated threshold in an HGR file (the bundled toy
# HGR has one); for another model, calibrate on its own images or set the threshold by hand.
DEFAULT_THRESHOLD = {"learned": 0.5, "concept": 0.5, "text": 0.5}
#: noise levels when neither the node nor the HGR file gives any
DEFAULT_LEVELS = 4


def select_rows(conditioning: list, rows: torch.Tensor, n_images: int, node: str, what: str) -> list:
    """The conditioning with one batch row per model row: batch 1 is repeated, batch N is indexed."""
    out = []
    for t, d in conditioning:
        if t.shape[0] not in (1, n_images):
            raise ValueError(f"{node}: the {what} conditioning has batch {t.shape[0]} but there are {n_images} "
                             "images. Give one conditioning for all images (batch 1) or one per image.")
        sel = rows if t.shape[0] > 1 else torch.zeros_like(rows)
        d = dict(d)
        p = d.get("pooled_output")
        if torch.is_tensor(p) and p.shape[0] > 1:
            d["pooled_output"] = p[rows if p.shape[0] == n_images else torch.zeros_like(rows)]
        elif torch.is_tensor(p):
            d["pooled_output"] = p.expand(len(rows), *p.shape[1:])
        out.append([t[sel], d])
    return out


def make_predict(mp, uncond: list, positive: list | None, concepts: list, n_images: int, node: str):
    model = mp.model
    device = mp.load_device

    def predict(x, sigma, rows):
        x, sigma = x.to(device), sigma.to(device)
        cols = [select_rows(uncond, rows, n_images, node, "empty-prompt")]
        if positive is not None:
            cols.append(select_rows(positive, rows, n_images, node, "positive"))
        cols += [select_rows(c, rows, n_images, node, "concept") for c in concepts]
        conds = [comfy.samplers.encode_model_conds(model.extra_conds, convert_cond(c), x, device, "positive")
                 for c in cols]
        with torch.no_grad():
            out = comfy.samplers.calc_cond_batch(model, conds, x, sigma, mp.model_options)
        d_u = out[0]
        d_c = out[1] if positive is not None else None
        rest = out[2:] if positive is not None else out[1:]
        return d_u, d_c, list(rest)

    return predict


def is_video_clip(vae, model) -> bool:
    """Whether the detector reads an IMAGE batch as the frames of one video clip: a video VAE (latents
    with a time axis) on a model that samples video (Wan and the other video families), not on an image
    family that borrows a video VAE (:data:`IMAGES_ON_VIDEO_VAE`)."""
    return int(getattr(vae, "latent_dim", 2)) == 3 and model_family(model) not in IMAGES_ON_VIDEO_VAE \
        and int(getattr(model.model.latent_format, "latent_dimensions", 2)) == 3


def run_detection(images, model, clip, vae, hgr: HGRHandle, positive, threshold: float, noise_levels: int,
                  seed: int, batch_size: int, node: str = "HGRHarmDetector", progress=None) -> Detection:
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"{node}: expected an IMAGE batch (B, H, W, 3), got shape {tuple(images.shape)}")
    hgr.check_model(model, node)
    red = hgr.redirector
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    concepts = list(hgr.concept_rows())
    if getattr(red, "kind", "") == "text":  # the paper's form: its distance on the scores, with the prompt
        if positive is None:
            raise ValueError(f"{node}: text HGR '{hgr.name}' reads the prompt, so it scores images only with "
                             "their prompt: connect 'positive' (the prompt the images were made with), or use a "
                             "latent HGR, which also scores images without one.")
        concepts = [text_negative(hgr, positive, uncond, 1.0, rewritten=False)]
        red = TextHGRScorer(red)
    if threshold <= 0:
        threshold = getattr(red, "detect_threshold", None) or DEFAULT_THRESHOLD.get(red.kind, 0.5)
    if noise_levels <= 0:  # auto: the levels the threshold was calibrated at
        noise_levels = getattr(red, "detect_levels", None) or DEFAULT_LEVELS
    n = images.shape[0]
    if n == 0:
        return detect(red, torch.zeros(0, 4, 1, 1), [1.0] * noise_levels, lambda *a: None,
                      with_prompt=positive is not None, threshold=threshold)
    if min(images.shape[1], images.shape[2]) < 8:
        raise ValueError(f"{node}: images must be at least 8x8 pixels, got {images.shape[2]}x{images.shape[1]}")
    ms = model.get_model_object("model_sampling")
    sigmas = [float(ms.percent_to_sigma(p)) for p in level_percents(noise_levels)]
    clip_mode = is_video_clip(vae, model)
    video_vae = int(getattr(vae, "latent_dim", 2)) == 3
    video_model = int(getattr(model.model.latent_format, "latent_dimensions", 2)) == 3
    if model_family(model) not in IMAGES_ON_VIDEO_VAE and video_vae != video_model:
        raise ValueError(f"{node}: the VAE is {'a video' if video_vae else 'an image'} VAE but the model "
                         f"({model_family(model) or 'unknown'}) samples {'video' if video_model else 'images'}. "
                         "Connect the VAE of the same checkpoint.")
    zs = []
    if clip_mode:  # a video model: the IMAGE batch is the frames of one clip, encoded (and scored) whole
        with torch.no_grad():
            zs.append(vae.encode(images[:, :, :, :3]).float().cpu())
    elif int(getattr(vae, "latent_dim", 2)) == 3:  # an image model on a video VAE: each image a clip of 1
        for i in range(n):
            with torch.no_grad():
                zs.append(vae.encode(images[i:i + 1, :, :, :3]).float().cpu())
    else:
        for i in range(0, n, max(1, batch_size)):  # encode in chunks too: the VAE is the other memory hog
            with torch.no_grad():
                zs.append(vae.encode(images[i:i + batch_size, :, :, :3]).float().cpu())
    z = torch.cat(zs)
    # checked before the model's own latent scaling, which fails on another channel count with a raw error
    if z.shape[1] != int(getattr(model.model.latent_format, "latent_channels", z.shape[1])):
        raise ValueError(f"{node}: the VAE gives {z.shape[1]}-channel latents but the model expects "
                         f"{model.model.latent_format.latent_channels}. Connect the VAE of the same checkpoint.")
    z = model.model.process_latent_in(z)
    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    try:
        predict = make_predict(model, uncond, positive, concepts, z.shape[0], node)

        def scale(s, nz, x0):
            return ms.noise_scaling(s.to(x0.device), nz.to(x0.device), x0)

        det = detect(red, z, sigmas, predict, noise_scaling=scale, with_prompt=positive is not None,
                     threshold=threshold, seed=seed, batch_images=batch_size, progress=progress)
        return det.for_frames(n) if clip_mode else det
    finally:
        model.cleanup()


def preview_radius(images: torch.Tensor) -> int:
    """The blur radius of a flagged preview: a tenth of the longer side (6 px at the least), so that
    the box blur's three passes leave colours, not shapes."""
    return max(6, round(max(images.shape[1], images.shape[2]) / 10))


def preview_ui(images, det: Detection, cls, revealable: bool = True) -> dict:
    """What the node shows in the UI. The previews are the ``images`` with every flagged one blurred
    *here, on the server*, so that every renderer, the queue and the assets panel get blurred files;
    the sharp flagged images are saved beside them (temp folder) and named only under
    ``hgr_reveal`` (one ``[filename, subfolder, type]`` or ``None`` per image), which the pack's web
    extension shows on a click on that image's reveal button. ``revealable`` False: no sharp copy is
    saved and nothing can be revealed (``hgr_reveal`` all ``None``)."""
    n = images.shape[0]
    flags = det.flags.bool()
    if n:
        shown = apply_action(images, flags, "blur", strength=preview_radius(images))
        out = ui.PreviewImage(shown, cls=cls).as_dict()
    else:
        out = {"images": []}
    reveal: list = [None] * n
    if revealable and bool(flags.any()):
        sharp = ui.PreviewImage(images[flags], cls=cls).as_dict()["images"]
        for i, r in zip(torch.nonzero(flags).flatten().tolist(), sharp):
            reveal[i] = [r["filename"], r["subfolder"], r["type"]]
    out["hgr_scores"] = [round(float(s), 6) for s in det.scores]
    out["hgr_flags"] = [bool(f) for f in det.flags]
    out["hgr_threshold"] = [float(det.threshold)]
    out["hgr_reveal"] = reveal
    return out


class HGRHarmDetector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRHarmDetector",
            display_name="SafeCFG Harm Detector",
            category=CATEGORY,
            description=("Scores each image's harmfulness with the HGR's harmful Euclidean distance (HED): the "
                         "image is noised to a few fixed levels and the redirector measures how much it would "
                         "redirect the model's guidance there. Works on generated or loaded images."),
            inputs=[
                io.Image.Input("images", tooltip="The images to score (any batch size, generated or loaded)."),
                io.Model.Input("model", tooltip="The diffusion model the HGR belongs to."),
                io.Clip.Input("clip", tooltip="The model's text encoder (for the empty prompt)."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the images into latents."),
                HGRType.Input("hgr", tooltip="A learned HGR (HGRLoader) or a concept redirector."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Optional: the prompt the images were made from (batch 1 or one per "
                                              "image). Without it the image's own direction is scored."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=100.0, step=0.001,
                               tooltip="Score above which an image is flagged. 0 = auto: the HGR file's "
                                       "calibrated threshold (the bundled toy HGR has one), else 0.5, an uncalibrated "
                                       "fallback. Lower flags more."),
                io.Int.Input("noise_levels", default=0, min=0, max=16,
                             tooltip="How many noise levels are averaged (one more model row each). 0 = auto: "
                                     "the levels the HGR file's threshold was calibrated at (the bundled toy "
                                     "latent HGR: 8; its text HGR: 4), else 4. Keep auto with the auto "
                                     "threshold."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the fixed noise; the same seed gives the same scores."),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Images per model call (times noise levels rows). Halved automatically "
                                     "when memory runs out."),
            ],
            outputs=[
                DetectionType.Output(display_name="detection",
                                     tooltip="Scores and flags, for SafeCFG Harm Filter."),
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="One score per image."),
                io.Boolean.Output(display_name="flags", is_output_list=True, tooltip="One flag per image."),
                io.String.Output(display_name="report", tooltip="A readable report, one line per image."),
                io.Int.Output(display_name="flagged_count", tooltip="How many images were flagged."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, model, clip, vae, hgr, threshold, noise_levels, seed, batch_size,
                positive=None) -> io.NodeOutput:
        n = images.shape[0]
        pbar = comfy.utils.ProgressBar(max(1, n))

        def progress(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, max(1, total))

        det = run_detection(images, model, clip, vae, hgr, positive, threshold, noise_levels, seed, batch_size,
                            progress=progress)
        return io.NodeOutput(det, [float(s) for s in det.scores], [bool(f) for f in det.flags], det.report(),
                             int(det.flags.sum()), ui=preview_ui(images, det, cls))


class HGRHarmFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRHarmFilter",
            display_name="SafeCFG Harm Filter",
            category=CATEGORY,
            description=("Applies one action to every flagged image and splits the batch into safe and flagged "
                         "images. Order is kept; nothing is dropped silently."),
            inputs=[
                io.Image.Input("images", tooltip="The images the detection was made on (same batch, same order)."),
                DetectionType.Input("detection", tooltip="From SafeCFG Harm Detector."),
                io.Combo.Input("action", options=list(ACTIONS), default="pass and flag",
                               tooltip="What happens to flagged images in the 'images' output: pass and flag "
                                       "(unchanged, marked in the UI), blur, pixelate, black, or replace."),
                io.Int.Input("strength", default=16, min=1, max=256,
                             tooltip="Blur radius or pixelate cell size in pixels. Recommended 8-32."),
                io.Image.Input("replacement", optional=True,
                               tooltip="For 'replace': the image shown instead (resized to fit; one per flagged "
                                       "image or one for all)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="All images, in order, the action applied to "
                                                               "flagged ones."),
                io.Image.Output(display_name="safe_images", tooltip="Only the images that were not flagged. "
                                                                    "When none is left, the nodes connected here "
                                                                    "are skipped."),
                io.Image.Output(display_name="flagged_images", tooltip="Only the flagged images, unchanged. When "
                                                                       "none is flagged, the nodes connected here are "
                                                                       "skipped."),
                io.String.Output(display_name="flagged_indices", tooltip="Comma-separated batch indices of the "
                                                                         "flagged images."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, detection, action, strength, replacement=None) -> io.NodeOutput:
        if not isinstance(detection, Detection):
            raise ValueError("HGRHarmFilter: 'detection' must come from SafeCFG Harm Detector")
        if detection.flags.shape[0] != images.shape[0]:
            raise ValueError(f"HGRHarmFilter: the detection covers {detection.flags.shape[0]} image(s) but "
                             f"{images.shape[0]} were given. Connect the same IMAGE batch to the detector and "
                             "the filter.")
        flags = detection.flags.bool()
        if action == "replace" and replacement is None:
            raise ValueError("HGRHarmFilter: action 'replace' needs an image on the 'replacement' input. Connect "
                             "one (e.g. Load Image) or choose another action.")
        out = apply_action(images, flags, action, strength=strength, replacement=replacement)
        safe, flagged = images[~flags], images[flags]
        idx = ",".join(str(i) for i in torch.nonzero(flags).flatten().tolist())
        # the previews show what the IMAGE output holds; an action that hides flagged images offers no
        # reveal (the action decided), 'pass and flag' does
        shown = preview_ui(out, detection, cls, revealable=action == "pass and flag")
        shown["hgr_action"] = [action]
        # an empty safe or flagged batch skips the nodes connected to it (core image nodes cannot take
        # a batch of 0); the batch itself is never changed
        return io.NodeOutput(out, safe if safe.shape[0] else ExecutionBlocker(None),
                             flagged if flagged.shape[0] else ExecutionBlocker(None), idx, ui=shown)
