"""SafeCFG's redirection math on plain tensors: the redirector interface, the strength blend,
the harmful Euclidean distance (HED) and the training-free concept redirector.

Shapes: a guidance direction ``g = D_c - D_u`` is ``(B, C, ...)`` in the model's denoised (x0) space;
``sigma`` is ``(B,)`` or a scalar. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("SafeCFG")

HED_EPS = 1e-6

# the concept redirector's default harmful concepts (one per line, "category: words")
DEFAULT_CONCEPTS = """sexual: nudity, naked body, explicit sexual content
violence: blood, gore, bloody wounds, violence
self-harm: self-harm, suicide, cutting
hate: hateful symbols, harassment, degrading caricature"""


@dataclass
class Redirection:
    """A redirector's answer for one step: the redirected direction ``R(g)`` and the per-sample HED."""

    g_red: torch.Tensor
    hed: torch.Tensor


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).float().norm(dim=1)


def hed(g: torch.Tensor, g_red: torch.Tensor, eps: float = HED_EPS) -> torch.Tensor:
    """Harmful Euclidean distance per sample: ``||R(g) - g|| / (||g|| + eps)``, float32 ``(B,)``."""
    return _flat_norm(g_red - g) / (_flat_norm(g) + eps)


def blend(g: torch.Tensor, g_red: torch.Tensor, strength: float) -> torch.Tensor:
    """``R_s(g) = g + s * (R(g) - g)``; exactly ``g`` where ``R(g) == g`` or ``s == 0``."""
    return g + (g_red - g) * strength


def sanitize(g: torch.Tensor, g_red: torch.Tensor, where: str = "redirector") -> torch.Tensor:
    """Replace non-finite redirected samples by the plain direction, with a warning.

    A NaN/inf from a broken HGR file or an overflowing step must never reach the sampler: the sample
    falls back to plain CFG for that step.
    """
    bad = ~torch.isfinite(g_red.flatten(1)).all(dim=1)
    if bool(bad.any()):
        log.warning("[SafeCFG] %s produced non-finite values for %d of %d samples; "
                    "using plain CFG for them at this step", where, int(bad.sum()), bad.numel())
        mask = bad.view(-1, *([1] * (g.ndim - 1)))
        g_red = torch.where(mask, g, g_red)
    return g_red


def sigma_per_sample(sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcastable ``(B, 1, 1, ...)`` float32 sigma for a batch shaped like ``like``."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device).flatten()
    if s.numel() == 1:
        s = s.expand(batch)
    elif s.numel() != batch:
        s = s[:1].expand(batch)
    return s.view(batch, *([1] * (like.ndim - 1)))


class Redirector:
    """Interface of every redirector.

    ``num_concepts`` is how many extra conditionings the sampler must evaluate in the same batched
    model call as cond/uncond; their denoised predictions arrive as ``concept_preds``.
    """

    kind: str = "base"
    num_concepts: int = 0

    def redirect(self, g: torch.Tensor, sigma: torch.Tensor, *, uncond: torch.Tensor | None = None,
                 concept_preds: list[torch.Tensor] | None = None) -> Redirection:
        raise NotImplementedError


class IdentityRedirector(Redirector):
    """``R(g) = g``. The neutral element; useful for tests and benchmarks."""

    kind = "identity"

    def redirect(self, g, sigma, *, uncond=None, concept_preds=None) -> Redirection:
        return Redirection(g, torch.zeros(g.shape[0], device=g.device))


# ---------------------------------------------------------------------------------------------
# Concept redirector (training-free)
# ---------------------------------------------------------------------------------------------

def _region_sum(t: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum of ``t`` over channels and over ``patch x patch`` spatial regions (0 = whole sample).

    Returns ``(B, 1)`` for global mode, ``(B, 1, h, w)`` region sums for patch mode.
    """
    if patch <= 0 or t.ndim != 4:
        return t.flatten(1).sum(dim=1, keepdim=True)
    s = t.sum(dim=1, keepdim=True)
    return F.avg_pool2d(s, patch, stride=patch, ceil_mode=True) * (patch * patch)


def _expand_regions(r: torch.Tensor, like: torch.Tensor, patch: int) -> torch.Tensor:
    if patch <= 0 or like.ndim != 4:
        return r.view(r.shape[0], *([1] * (like.ndim - 1)))
    r = r.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return r[:, :, : like.shape[2], : like.shape[3]]


def concept_gates(g: torch.Tensor, h: torch.Tensor, tau: float, ramp: float, patch: int = 0):
    """Cosine of ``g`` to ``h`` per region, the gate rising 0 -> 1 from ``tau`` to ``min(tau + ramp, 1)``,
    and the projection coefficient ``<g,h>/<h,h>``."""
    g32, h32 = g.float(), h.float()
    dot = _region_sum(g32 * h32, patch)
    hh = _region_sum(h32 * h32, patch)
    gg = _region_sum(g32 * g32, patch)
    cos = dot / (gg.sqrt() * hh.sqrt() + 1e-12)
    # the ramp never reaches past cos = 1, so a perfectly aligned direction is always fully gated
    gate = ((cos - tau) / max(min(ramp, 1.0 - tau), 1e-6)).clamp(0.0, 1.0)
    coef = dot / (hh + 1e-12)
    return cos, gate, coef


def concept_redirect(g: torch.Tensor, directions: list[torch.Tensor], *, tau: float = 0.2,
                     ramp: float = 0.1, push: float = 0.0, patch: int = 0) -> torch.Tensor:
    """Remove from ``g`` its component along each harmful concept direction ``h_k`` that it aligns with.

    ``g' = g - sum_k gate_k * (proj_{h_k}(g) + push * h_k)``, applied concept after concept so that
    near-duplicate concepts ("knife", "dagger") do not remove the same component twice. A gate is 0
    (``g`` returned unchanged, bit for bit) while the cosine stays below ``tau``: clean guidance is
    untouched. ``patch`` > 0 computes cosines and projections per ``patch x patch`` latent region.
    """
    out = g
    for h in directions:
        _, gate, coef = concept_gates(out, h, tau, ramp, patch)
        if not bool((gate > 0).any()):
            continue
        w = _expand_regions(gate * (coef + push), out, patch)
        out = out - (w * h.float()).to(out.dtype)
    return out


class ConceptRedirector(Redirector):
    """Training-free redirector: harmful concepts given as conditionings, their directions
    ``h_k = D(x, c_k) - D_u`` computed in the sampler's batched model call."""

    kind = "concept"

    def __init__(self, num_concepts: int, *, tau: float = 0.2, ramp: float = 0.1, push: float = 0.0,
                 patch: int = 0, names: list[str] | None = None):
        if num_concepts < 1:
            raise ValueError("a concept redirector needs at least one concept")
        self.num_concepts = num_concepts
        self.tau, self.ramp, self.push, self.patch = tau, ramp, push, patch
        self.names = names or [f"concept {i}" for i in range(num_concepts)]

    def redirect(self, g, sigma, *, uncond=None, concept_preds=None) -> Redirection:
        if uncond is None or concept_preds is None or len(concept_preds) != self.num_concepts:
            raise ValueError("the concept redirector needs the uncond prediction and one prediction per concept")
        dirs = [c - uncond for c in concept_preds]
        g_red = concept_redirect(g, dirs, tau=self.tau, ramp=self.ramp, push=self.push, patch=self.patch)
        g_red = sanitize(g, g_red, "concept redirector")
        return Redirection(g_red, hed(g, g_red))
