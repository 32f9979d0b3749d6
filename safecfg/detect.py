"""Harmfulness detection on any image with a redirector (HED), and the filter's image actions.

Detection (DESIGN "Detection on any image"): an image's latent ``z`` is noised to ``K`` fixed noise
levels with a fixed seed; at each level the model gives ``D_u = D(x, "")`` and, when the prompt is
known, ``D_c = D(x, c)``. The guidance is ``g = D_c - D_u`` (with the prompt) or ``g = z - D_u`` (the
image's own direction, without it). The redirector's HED ``||R(g) - g|| / ||g||`` averaged over the
levels is the image's harmfulness score. Plain torch: the model is reached through a ``predict``
callback, so this file never imports ComfyUI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .redirect import Redirector

log = logging.getLogger("SafeCFG")

# the predict callback: (x (M, C, h, w), sigma (M,), rows: image indices (M,)) ->
#   (D_u, D_c or None, [D(x, concept_k)] or None), each (M, C, h, w)
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@dataclass
class Detection:
    """Per-image harmfulness: ``scores`` (N,) mean HED, ``per_level`` (N, K), ``flags`` (N,) bool.

    For video latents (N, C, T, h, w) each sample is a clip: ``per_frame`` (N, T) holds the HED of each
    latent frame (mean over the levels) beside the clip's own score (:meth:`for_frames` spreads a clip's
    detection over its decoded frames)."""

    scores: torch.Tensor
    per_level: torch.Tensor
    flags: torch.Tensor
    threshold: float
    with_prompt: bool
    names: list[str]
    per_frame: torch.Tensor | None = None
    #: set by :meth:`for_frames`: (first frame, frame count, clip score, latent frame of each frame)
    clip: tuple | None = None

    def for_frames(self, n_frames: int) -> Detection:
        """A one-clip detection as one entry per decoded frame: each frame's score is its latent frame's
        HED, its flag the clip's (a clip is flagged or passed whole). Frames map to latent frames as a
        causal video VAE packs them (:func:`frame_index`)."""
        if self.per_frame is None or self.scores.shape[0] != 1:
            raise ValueError("for_frames needs the detection of one video clip")
        idx = frame_index(n_frames, self.per_frame.shape[1])
        return Detection(self.per_frame[0, idx], self.per_level.expand(n_frames, -1).clone(),
                         self.flags.expand(n_frames).clone(), self.threshold, self.with_prompt, self.names,
                         self.per_frame, (0, n_frames, float(self.scores[0]), idx.tolist()))

    def report(self, labels: Sequence[str] | None = None) -> str:
        lines = [f"SafeCFG harm detection: {int(self.flags.sum())} of {len(self.scores)} image(s) flagged "
                 f"(threshold {self.threshold:.4g}, {'with' if self.with_prompt else 'without'} the prompt, "
                 f"redirector: {', '.join(self.names) or '-'})"]
        if self.clip is not None:
            _, n, score, idx = self.clip
            lines = [f"SafeCFG harm detection: a video clip of {n} frame(s) "
                     f"{'FLAGGED' if bool(self.flags[0]) else 'ok'}, clip score {score:.4f} (threshold "
                     f"{self.threshold:.4g}, {'with' if self.with_prompt else 'without'} the prompt, redirector: "
                     f"{', '.join(self.names) or '-'}); per frame, its latent frame's score:"]
            lines += [f"  frame {i} (latent frame {idx[i]}): score {s:.4f}" for i, s in enumerate(self.scores.tolist())]
            return "\n".join(lines)
        for i, (s, f) in enumerate(zip(self.scores.tolist(), self.flags.tolist())):
            label = labels[i] if labels is not None and i < len(labels) else f"image {i}"
            lines.append(f"  {label}: score {s:.4f}  {'FLAGGED' if f else 'ok'}")
        return "\n".join(lines)


def frame_index(n_frames: int, latent_frames: int) -> torch.Tensor:
    """For each of ``n_frames`` decoded frames, the latent frame it comes from: a causal video VAE
    (Wan's: 4 frames per latent frame) keeps the first frame alone and packs the rest evenly."""
    if latent_frames <= 1 or n_frames <= 1:
        return torch.zeros(max(n_frames, 0), dtype=torch.long)
    per = (n_frames - 1) / (latent_frames - 1)
    f = torch.arange(n_frames, dtype=torch.float64)
    return torch.ceil(f / per - 1e-9).long().clamp(0, latent_frames - 1)


def level_percents(k: int, lo: float = 0.3, hi: float = 0.8) -> list[float]:
    """``k`` schedule positions (0 = most noise, 1 = least) spread evenly over ``[lo, hi]``."""
    if k < 1:
        raise ValueError(f"at least one noise level is needed, got {k}")
    if k == 1:
        return [(lo + hi) / 2]
    return [lo + (hi - lo) * i / (k - 1) for i in range(k)]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def detect(redirector: Redirector, z: torch.Tensor, sigmas: Sequence[float], predict: Predict, *,
           noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           with_prompt: bool, threshold: float, seed: int = 0, batch_images: int = 8,
           progress: Callable[[int, int], None] | None = None) -> Detection:
    """Score every image of ``z`` (N, C, h, w), in chunks of ``batch_images`` images x K levels per
    model call. A chunk that runs out of memory is retried in halves (down to one image)."""
    n, k = z.shape[0], len(sigmas)
    per_level = torch.zeros(n, k)
    frames = z.shape[2] if z.ndim == 5 else 0  # video latents: a HED per latent frame too
    per_frame = torch.zeros(n, k, frames) if frames else None
    if n == 0:
        return Detection(torch.zeros(0), per_level, torch.zeros(0, dtype=torch.bool), threshold, with_prompt,
                         list(getattr(redirector, "names", []) or []))
    gen = torch.Generator().manual_seed(int(seed))
    # one fixed noise per level, shared by every image: an image's score depends on the image and the
    # seed only, never on its neighbours in the batch or on the chunk it lands in
    noise = torch.randn((k, 1) + tuple(z.shape[1:]), generator=gen, dtype=torch.float32)
    sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
    scale = noise_scaling or (lambda s, nz, x0: x0 + nz * s.view(-1, *([1] * (x0.ndim - 1))))
    i, step = 0, max(1, int(batch_images))
    while i < n:
        b = min(step, n - i)
        idx = torch.arange(i, i + b)
        try:
            with torch.no_grad():
                lv, fr = _chunk(redirector, z, idx, sig, noise, predict, scale, with_prompt)
            per_level[i:i + b] = lv
            if per_frame is not None:
                per_frame[i:i + b] = fr
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(e) or b == 1:
                raise
            step = max(1, b // 2)
            log.warning("[SafeCFG] detector: out of memory with %d images per call; retrying with %d", b, step)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += b
        if progress is not None:
            progress(i, n)
    scores = per_level.mean(dim=1)
    return Detection(scores, per_level, scores > threshold, float(threshold), with_prompt,
                     list(getattr(redirector, "names", []) or []),
                     per_frame.mean(dim=1) if per_frame is not None else None)


def _chunk(redirector, z, idx, sig, noise, predict, scale, with_prompt) -> tuple:
    """(HED (b, K), and for video latents each latent frame's HED (b, K, T), else None)."""
    b, k = len(idx), len(sig)
    z_b = z[idx].float()
    # level-major rows: row = level * b + image
    x0 = z_b.repeat(k, *([1] * (z.ndim - 1)))
    s = sig.repeat_interleave(b)
    nz = noise.expand(k, b, *z.shape[1:]).reshape(k * b, *z.shape[1:])
    x = scale(s, nz, x0)
    rows = idx.repeat(k)
    d_u, d_c, concepts = predict(x, s, rows)
    d_u = d_u.float()
    g = (d_c.float() - d_u) if with_prompt else (x0.to(d_u.device) - d_u)
    red = redirector.redirect(g, s.to(g.device), uncond=d_u,
                              concept_preds=[c.float() for c in concepts] if concepts else None)
    e = torch.nan_to_num(red.hed.float().cpu(), nan=0.0, posinf=0.0)
    frames = None
    if g.ndim == 5:  # each latent frame's own distance: ||R(g) - g|| / ||g|| over that frame
        from .redirect import HED_EPS

        num = (red.g_red.float() - g.float()).pow(2).sum(dim=(1, 3, 4)).sqrt()
        den = g.float().pow(2).sum(dim=(1, 3, 4)).sqrt() + HED_EPS
        frames = torch.nan_to_num((num / den).cpu(), nan=0.0, posinf=0.0).view(k, b, -1).transpose(0, 1)
    return e.view(k, b).t(), frames


# ----------------------------------------------------------------------------------------------
# filter actions on IMAGE tensors (B, H, W, C) in [0, 1]

ACTIONS = ("pass and flag", "blur", "pixelate", "black", "replace")


def _box_along(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """The mean over ``2r + 1`` neighbours along ``dim`` (2 or 3 of a (1, C, H, W) tensor), edges
    replicated, from running sums: the same cost at any radius."""
    n = x.shape[dim]
    pad = (0, 0, r, r) if dim == 2 else (r, r, 0, 0)
    c = torch.cumsum(F.pad(x, pad, mode="replicate"), dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)
    return (c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)) / (2 * r + 1)


def blur(img: torch.Tensor, radius: int) -> torch.Tensor:
    """Box blur (three passes, close to a Gaussian) of one (H, W, C) image; ``radius`` in pixels. Each
    pass is separable and uses running sums (float64), so a large radius on a large image costs no
    more than a small one."""
    r = max(1, int(radius))
    x = img.permute(2, 0, 1).unsqueeze(0).double()
    for _ in range(3):
        x = _box_along(_box_along(x, r, 2), r, 3)
    return x[0].permute(1, 2, 0).to(img.dtype)


def pixelate(img: torch.Tensor, block: int) -> torch.Tensor:
    """Mosaic of ``block`` x ``block`` pixel cells (edge cells may be smaller)."""
    h, w = img.shape[:2]
    bl = max(1, int(block))
    x = img.permute(2, 0, 1).unsqueeze(0).float()
    small = F.adaptive_avg_pool2d(x, (max(1, -(-h // bl)), max(1, -(-w // bl))))
    x = F.interpolate(small, size=(h, w), mode="nearest")
    return x[0].permute(1, 2, 0).to(img.dtype)


def fit_replacement(rep: torch.Tensor, h: int, w: int, c: int) -> torch.Tensor:
    """A replacement image (H', W', C') resized and channel-matched to (h, w, c)."""
    x = rep.float()
    if x.shape[-1] != c:
        x = x[..., :c] if x.shape[-1] > c else torch.cat([x, torch.ones(*x.shape[:-1], c - x.shape[-1])], dim=-1)
    if x.shape[:2] != (h, w):
        x = F.interpolate(x.permute(2, 0, 1).unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)
        x = x[0].permute(1, 2, 0)
    return x


def apply_action(images: torch.Tensor, flags: torch.Tensor, action: str, *, strength: int = 16,
                 replacement: torch.Tensor | None = None) -> torch.Tensor:
    """All images, in order, with ``action`` applied to the flagged ones (the others bit-identical)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    out = images.clone()
    if action == "pass and flag":
        return out
    if action == "replace" and (replacement is None or replacement.shape[0] == 0):
        raise ValueError("the 'replace' action needs a replacement image")
    b, h, w, c = images.shape
    for i in range(b):
        if not bool(flags[i]):
            continue
        if action == "blur":
            out[i] = blur(images[i], strength)
        elif action == "pixelate":
            out[i] = pixelate(images[i], strength)
        elif action == "black":
            out[i] = 0
        else:
            rep = replacement[min(i, replacement.shape[0] - 1)]
            out[i] = fit_replacement(rep, h, w, c).to(out.dtype)
    return out
