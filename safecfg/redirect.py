"""SafeCFG's redirection math on plain tensors: the redirector interface, the strength blend,
the harmful Euclidean distance (HED) and the training-free concept redirector.

Shapes: a guidance direction ``g = D_c - D_u`` is ``(B, C, ...)`` in the model's denoised (x0) space;
``sigma`` is ``(B,)`` or a scalar. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import functools
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


def inference_grad(*inputs: torch.Tensor):
    """The autograd mode of a redirector's forward: no graph (inference), unless an input itself
    requires grad with grad enabled, as in a white-box attack that differentiates the defended sampler
    with respect to its prompt. Either way the values are the same."""
    if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in inputs):
        return contextlib.nullcontext()
    return torch.no_grad()


def frozen(fn):
    """Decorator: ``fn(self, x, ...)`` runs under :func:`inference_grad` of ``x``."""

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        with inference_grad(x):
            return fn(self, x, *args, **kwargs)

    return wrapper


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


def blend(g: torch.Tensor, g_red: torch.Tensor, strength: float, base: torch.Tensor | None = None) -> torch.Tensor:
    """``R_s(g) = g + s * (R(g) - g)``; exactly ``g`` where ``R(g) == g`` or ``s == 0``.

    With ``base`` (the conditional prediction ``D_c``, where ``g = D_c - D_u``) the same shift is
    added to ``base`` instead: ``D_c + s * (R(g) - g)``, whose CFG direction is ``R_s(g)``. That is
    the form the sampler uses: ``D_c`` passes through bit-exact where ``R(g) == g``."""
    return (g if base is None else base) + (g_red - g) * strength


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
                 concept_preds: list[torch.Tensor] | None = None, state: dict | None = None) -> Redirection:
        """``state``: a dict the sampler keeps for one sampling run (fresh per run), for redirectors
        that weigh evidence across steps; ``None`` (detection, training) means every call stands alone."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Concept redirector (training-free)
# ---------------------------------------------------------------------------------------------

def _region_sum(t: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum of ``t`` over channels and over ``patch x patch`` spatial regions (0 = whole sample).

    Returns ``(B, 1)`` for global mode, ``(B, 1, h, w)`` region sums for patch mode on image latents
    ``(B, C, H, W)``, and ``(B, 1, T, h, w)`` on video latents ``(B, C, T, H, W)``: regions of each
    frame (a latent frame), so an object in some frames is redirected there and only there.
    """
    if patch <= 0 or t.ndim not in (4, 5):
        return t.flatten(1).sum(dim=1, keepdim=True)
    s = t.sum(dim=1, keepdim=True)
    if t.ndim == 5:
        return F.avg_pool3d(s, (1, patch, patch), stride=(1, patch, patch), ceil_mode=True) * (patch * patch)
    return F.avg_pool2d(s, patch, stride=patch, ceil_mode=True) * (patch * patch)


def _expand_regions(r: torch.Tensor, like: torch.Tensor, patch: int) -> torch.Tensor:
    if patch <= 0 or like.ndim not in (4, 5) or r.ndim != like.ndim:
        return r.view(r.shape[0], *([1] * (like.ndim - 1)))
    r = r.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)
    return r[..., : like.shape[-2], : like.shape[-1]]


def _ramp(cos: torch.Tensor, start: float, ramp: float) -> torch.Tensor:
    """0 below ``start``, rising to 1 at ``start + ramp``; the ramp never reaches past cos = 1, so a
    perfectly aligned direction is always fully gated."""
    return ((cos - start) / max(min(ramp, 1.0 - start), 1e-6)).clamp(0.0, 1.0)


def concept_gates(g: torch.Tensor, h: torch.Tensor, tau: float, ramp: float, patch: int = 0):
    """Cosine of ``g`` to ``h`` per region, the gate rising 0 -> 1 from ``tau`` to ``min(tau + ramp, 1)``,
    the projection coefficient ``<g,h>/<h,h>`` and ``<h,h>`` itself."""
    g32, h32 = g.float(), h.float()
    dot = _region_sum(g32 * h32, patch)
    hh = _region_sum(h32 * h32, patch)
    gg = _region_sum(g32 * g32, patch)
    cos = dot / (gg.sqrt() * hh.sqrt() + 1e-12)
    gate = _ramp(cos, tau, ramp)
    coef = dot / (hh + 1e-12)
    return cos, gate, coef, hh


def push_direction(directions: list[torch.Tensor]) -> torch.Tensor:
    """The direction a matched concept is pushed away along: the mean of *all* concept directions.

    Pushing away from one harmful concept alone can push towards another (in the toy world, "away
    from a round skull" draws a thin blade: measured, 14 of 60 pushed harmful prompts turned into the
    other harmful class); away from all of them at once it does not (3 of 60).
    """
    if len(directions) == 1:
        return directions[0].float()
    return torch.stack([d.float() for d in directions]).mean(0)


def concept_redirect(g: torch.Tensor, directions: list[torch.Tensor], *, tau: float = 0.2,
                     ramp: float = 0.1, push: float = 0.0, patch: int = 0,
                     push_tau: float | None = None, memory: float = 0.0,
                     evidence: dict | None = None,
                     replacements: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Remove from ``g`` its component along each harmful concept direction ``h_k`` that it aligns with.

    ``g' = g - sum_k (gate_k * proj_{h_k}(g) + push * pgate_k * p)``, applied concept after concept
    so that near-duplicate concepts ("knife", "dagger") do not remove the same component twice.
    ``gate_k`` rises from 0 to 1 as the cosine of ``g`` to ``h_k`` goes from ``tau`` to ``tau + ramp``:
    removing the aligned component is harmless to a clean direction that happens to align a little.
    The push steers away along ``p`` (:func:`push_direction`), so it is kept for confident matches:
    ``pgate_k`` rises from ``push_tau`` (default ``tau``), on the cosine or, with ``evidence`` (a
    per-run dict) and ``memory`` > 0, on its running average over the sampler's calls
    ``e = memory * e_prev + (1 - memory) * cos``: a clean prompt whose guidance brushes a concept for
    a step is not pushed, a harmful one that stays aligned is. After a push the removal pass runs once
    more. Both gates are 0 (``g`` returned unchanged, bit for bit) while the cosine stays below ``tau``
    and the push evidence below ``push_tau``. ``patch`` > 0 computes cosines and projections per
    ``patch x patch`` latent region.

    ``replacements[k]`` (or None), the direction of a named safe concept (``D(x, safe) - D_u``):
    what is removed along ``h_k`` is put back along it, ``+ gate_k * coef_k * s_k``, so the guidance
    steers towards the safe concept where the harmful one was forming instead of only erasing it.
    """
    push_tau = tau if push_tau is None else push_tau
    out = g
    p = None  # the push direction, made once when first needed
    for k, h in enumerate(directions):
        cos, gate, coef, hh = concept_gates(out, h, tau, ramp, patch)
        pcos = cos
        if evidence is not None and memory > 0:
            prev = evidence.get(k)
            if prev is not None and prev.shape == cos.shape and prev.device == cos.device:
                pcos = memory * prev + (1.0 - memory) * cos
            evidence[k] = pcos.detach()
        pgate = gate if (push_tau == tau and pcos is cos) else _ramp(pcos, push_tau, ramp)
        if bool((gate > 0).any()):
            amount = _expand_regions(gate * coef, out, patch)
            out = out - (amount * h.float()).to(out.dtype)
            if replacements is not None and replacements[k] is not None:
                repl = replacements[k].float()
                # the safe direction at the harmful one's size: where the concept was, its counterpart
                scale = (hh / (_region_sum(repl ** 2, patch) + 1e-12)).sqrt()
                out = out + (amount * _expand_regions(scale, out, patch) * repl).to(out.dtype)
        if push > 0 and bool((pgate > 0).any()):
            p = push_direction(directions) if p is None else p
            out = out - (_expand_regions(push * pgate, out, patch) * p).to(out.dtype)
    if p is not None:  # pushed: the removal pass once more
        out = concept_redirect(out, directions, tau=tau, ramp=ramp, push=0.0, patch=patch, replacements=replacements)
    return out


class ConceptRedirector(Redirector):
    """Training-free redirector: harmful concepts given as conditionings, their directions
    ``h_k = D(x, c_k) - D_u`` computed in the sampler's batched model call."""

    kind = "concept"

    def __init__(self, num_concepts: int, *, tau: float = 0.2, ramp: float = 0.1, push: float = 0.0,
                 patch: int = 0, names: list[str] | None = None, push_tau: float | None = None,
                 memory: float = 0.0, targets: list[int | None] | None = None, num_safe: int = 0,
                 text_stage=None):
        if num_concepts < 1:
            raise ValueError("a concept redirector needs at least one concept")
        targets = list(targets) if targets is not None else [None] * num_concepts
        if len(targets) != num_concepts or any(t is not None and not 0 <= t < num_safe for t in targets):
            raise ValueError(f"concept redirector: targets must give, for each of the {num_concepts} concepts, "
                             f"None or an index below num_safe ({num_safe}); got {targets}")
        #: harmful concepts, then the named safe concepts they are replaced by (``a -> b``): the rows
        #: the sampler evaluates, in this order
        self.num_harmful, self.num_safe, self.targets = num_concepts, int(num_safe), targets
        self.num_concepts = num_concepts + self.num_safe
        self.tau, self.ramp, self.push, self.patch = tau, ramp, push, patch
        self.push_tau = tau if push_tau is None else push_tau
        if not 0.0 <= memory < 1.0:
            raise ValueError(f"concept redirector: memory must be in [0, 1), got {memory}")
        self.memory = memory
        self.names = names or [f"concept {i}" for i in range(num_concepts)]
        #: the optional text stage (:class:`safecfg.concept_text.TextConceptStage`): the same concepts
        #: redirected in the positive prompt's token embedding, once per prompt, before the model
        self.text_stage = text_stage

    @property
    def rewrites(self) -> bool:
        return self.text_stage is not None

    def rewrite(self, emb: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The positive prompt's text embedding with the concepts redirected by the text stage (the same
        tensor without a text stage or where no concept matches)."""
        return emb if self.text_stage is None else self.text_stage.rewrite(emb, strength)

    @property
    def latent_stage(self) -> bool:
        """Whether the latent stage can ever act. A threshold of 1.0 (the node's "off") opens no gate, as
        no cosine exceeds 1; the push needs a push threshold below 1 as well. When it cannot act the
        sampler evaluates no concept row (the text stage alone costs nothing per step) and
        :meth:`redirect` returns ``g`` itself."""
        return self.tau < 1.0 or (self.push > 0 and self.push_tau < 1.0)

    def redirect(self, g, sigma, *, uncond=None, concept_preds=None, state=None) -> Redirection:
        if not self.latent_stage:
            return Redirection(g, hed(g, g))
        if uncond is None or concept_preds is None or len(concept_preds) != self.num_concepts:
            raise ValueError("the concept redirector needs the uncond prediction and one prediction per concept")
        dirs = [c - uncond for c in concept_preds]
        dirs, safe = dirs[:self.num_harmful], dirs[self.num_harmful:]
        repl = [None if t is None else safe[t] for t in self.targets] if self.num_safe else None
        g_red = concept_redirect(g, dirs, tau=self.tau, ramp=self.ramp, push=self.push, patch=self.patch,
                                 push_tau=self.push_tau, memory=self.memory, evidence=self._evidence(state, sigma, g),
                                 replacements=repl)
        g_red = sanitize(g, g_red, "concept redirector")
        return Redirection(g_red, hed(g, g_red))

    def _evidence(self, state: dict | None, sigma, g: torch.Tensor) -> dict | None:
        """This run's running push evidence, restarted when the batch changes or sigma rises (a new
        run, or a restart sampler's jump back up)."""
        if state is None or self.memory <= 0:
            return None
        s = float(torch.as_tensor(sigma).flatten()[0])
        ev = state.get("concept_evidence")
        if ev is None or ev.get("batch") != g.shape[0] or s > ev.get("sigma", float("inf")) * (1 + 1e-6):
            ev = state["concept_evidence"] = {"batch": g.shape[0], "cos": {}}
        ev["sigma"] = s
        return ev["cos"]
