"""The paper's form of the Harmful Guidance Redirector: a small Transformer over the prompt's text
embedding whose output takes the place of the empty-prompt embedding in CFG's unconditional branch.

    eps~ = eps(x_t, c) + w * (eps(x_t, c) - eps(x_t, HGR(c)))

``HGR(c) = e_empty + Delta(c)``: ``e_empty`` is the checkpoint's empty-prompt embedding (stored in the
file), ``Delta`` a pre-norm Transformer over the token sequence whose output layer starts at zero, so
an untrained HGR returns the empty-prompt embedding for every prompt and CFG is unchanged. It is
computed once per prompt (never per sampling step); its cost per step is nil.

Two token layouts (``TextHGRConfig.layout``):

- ``0``, chunks (CLIP-only families: SD1.x, SD2.x, SDXL): a prompt longer than one chunk (``tokens``,
  77) is processed chunk by chunk, and the empty embedding is repeated once per chunk, as ComfyUI itself
  repeats a shorter unconditional embedding to the length of the conditional one.
- ``1``, sequence (T5, UMT5 and LLM-based encoders: SD3, Flux, Chroma, Wan, Qwen-Image, Z-Image, ...):
  the Transformer reads the whole sequence at once (positions past ``tokens``, the length of the
  positional table, share its last row), and ``HGR(c)`` has the prompt's own length: the empty (or
  negative) embedding is mapped onto the prompt's positions by :func:`safecfg.concept_text.align`
  (position by position for equal lengths, as with Flux's and SD3's padded T5; the chat template's
  shared prefix position by position and its tail right-aligned for encoders whose output length varies
  with the prompt). The sampler gives such an unconditional branch the positive's attention mask.

Plain torch; nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .redirect import frozen


@dataclass
class TextHGRConfig:
    """Architecture of a text-embedding HGR. Stored as JSON in every file of this kind."""

    embed_dim: int = 768  # the width of the text embedding (the UNet's context dimension)
    tokens: int = 77  # tokens per chunk of the embedding (CLIP: 77)
    width: int = 256  # the Transformer's width
    layers: int = 2
    heads: int = 4
    rewrite: int = 0  # 1: the file also holds a rewriter of the prompt's own embedding (see TextHGRNet)
    layout: int = 0  # 0: chunks of ``tokens`` (CLIP); 1: the whole sequence, any length (see the module doc)
    empty_tokens: int = 0  # the sequence layout: the empty prompt's own length (0: ``tokens``)

    LIMITS = {"embed_dim": (8, 8192), "tokens": (1, 4096), "width": (8, 2048), "layers": (1, 12),
              "heads": (1, 32), "rewrite": (0, 1), "layout": (0, 1), "empty_tokens": (0, 4096)}

    def validate(self) -> TextHGRConfig:
        for name, (lo, hi) in self.LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.empty_tokens and (self.layout != 1 or self.empty_tokens > self.tokens):
            raise ValueError(f"'empty_tokens' ({self.empty_tokens}) is for the sequence layout (1) and at most "
                             f"'tokens' ({self.tokens})")
        return self

    @property
    def empty_length(self) -> int:
        """The stored empty-prompt embedding's length."""
        return self.empty_tokens or self.tokens

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TextHGRConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the architecture must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**data).validate()


class _TokenNet(nn.Module):
    """A pre-norm Transformer over chunks of ``tokens`` embeddings, ``(B, T, D) -> (B, T, D)``, whose
    output layer starts at zero (so an untrained one adds nothing)."""

    def __init__(self, config: TextHGRConfig):
        super().__init__()
        t, d, w = config.tokens, config.embed_dim, config.width
        self.tokens = t
        self.inp = nn.Linear(d, w)
        self.pos = nn.Parameter(torch.zeros(t, w))
        layer = nn.TransformerEncoderLayer(w, config.heads, 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.layout = config.layout

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return _run(self, self.tokens, cond, self.layout)


def _run(m: nn.Module, tokens: int, cond: torch.Tensor, layout: int = 0) -> torch.Tensor:
    """``m``'s ``inp, pos, encoder, norm, out`` over ``cond``: chunk by chunk of ``tokens`` (layout 0),
    or the whole sequence (layout 1; positions past the table share its last row)."""
    b, length, d = cond.shape
    if layout == 1:
        pos = m.pos[torch.arange(length, device=cond.device).clamp(max=m.pos.shape[0] - 1)]
        return m.out(m.norm(m.encoder(m.inp(cond.float()) + pos)))
    chunks = cond.float().reshape(b * (length // tokens), tokens, d)
    h = m.encoder(m.inp(chunks) + m.pos)
    return m.out(m.norm(h)).reshape(b, length, d)


def on_positions(base: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``base`` (B or 1, T_b, D) mapped onto ``cond``'s ``T`` positions (the sequence layout): itself for
    equal lengths, else by :func:`safecfg.concept_text.align` (the shared prefix position by position,
    the rest right-aligned), read against the first prompt of the batch."""
    if base.shape[1] == cond.shape[1]:
        return base
    from .concept_text import align

    idx = align(cond.shape[1], base[0], cond[0].to(base.dtype)).to(base.device)
    return base[:, idx]


class TextHGRNet(nn.Module):
    """``(B, T, D)`` prompt embedding -> ``(B, T, D)`` unconditional embedding: ``T`` a multiple of
    ``config.tokens`` (the chunk layout) or any length (the sequence layout). ``empty``: the empty
    prompt's embedding, ``(config.empty_length, D)``.

    With ``config.rewrite`` it also holds ``rewriter``, a second Transformer that rewrites the prompt's
    *own* embedding towards its safe rewrite's (``c + Delta_r(c)``, trained on embedding pairs), gated
    per prompt by the harmful Euclidean distance on embeddings (:meth:`TextHGR.distance`): the gate
    rises 0 -> 1 between the two values of the ``rewrite_gate`` buffer, so a prompt the HGR reads as
    clean keeps its embedding bit for bit."""

    def __init__(self, config: TextHGRConfig, empty: torch.Tensor | None = None):
        super().__init__()
        config.validate()
        self.config = config
        t, d = config.empty_length, config.embed_dim
        if empty is None:
            empty = torch.zeros(t, d)
        if tuple(empty.shape) != (t, d):
            raise ValueError(f"the empty-prompt embedding must have shape ({t}, {d}), got {tuple(empty.shape)}")
        self.register_buffer("empty", empty.detach().float().clone())
        net = _TokenNet(config)
        # the paper's HGR keeps its parameters at the top level (the file's keys since format 1)
        self.inp, self.pos, self.encoder, self.norm, self.out = net.inp, net.pos, net.encoder, net.norm, net.out
        if config.rewrite:
            self.rewriter = _TokenNet(config)
            self.register_buffer("rewrite_gate", torch.tensor([1e3, 1e3 + 1.0]))  # closed until trained

    def delta(self, cond: torch.Tensor) -> torch.Tensor:
        """``Delta(c)``, float32, differentiable (for training)."""
        return _run(self, self.config.tokens, cond, self.config.layout)

    def empty_for(self, cond: torch.Tensor) -> torch.Tensor:
        """The empty-prompt embedding on ``cond``'s positions, ``(1, T, D)``."""
        if self.config.layout == 1:
            return on_positions(self.empty[None], cond)
        return self.empty.repeat(cond.shape[1] // self.config.tokens, 1)[None]

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.empty_for(cond).expand(cond.shape[0], -1, -1) + self.delta(cond)


def count_text_params(config: TextHGRConfig) -> int:
    """Parameter count of an architecture, without allocating it (the meta device)."""
    with torch.device("meta"):
        net = TextHGRNet(config)
    return sum(p.numel() for p in net.parameters())


class TextHGR:
    """The text-embedding redirector: ``uncond(c)`` is the embedding CFG's unconditional branch uses
    for prompt ``c``. ``family`` names the text-encoder layout it was trained for (e.g. ``SD15``)."""

    kind = "text"

    def __init__(self, net: TextHGRNet, *, family: str = "", categories: list[str] | None = None,
                 name: str = "HGR"):
        self.net = net.eval()
        self.config = net.config
        self.family = family
        self.categories = list(categories or [])
        self.name = name
        self.names = [name]
        self.detect_threshold: float | None = None
        self.detect_levels: int | None = None
        self.metadata: dict = {}

    def check(self, cond: torch.Tensor, where: str = "") -> None:
        """Fail, naming ``where`` and the fix, when ``cond`` is not an embedding this HGR reads."""
        who = f"{where}: " if where else ""
        t, d = self.config.tokens, self.config.embed_dim
        if self.config.layout == 1:
            if cond.ndim != 3 or cond.shape[-1] != d or cond.shape[1] < 1:
                raise ValueError(f"{who}text HGR '{self.name}' reads text embeddings of width {d} (a token sequence "
                                 f"of any length), got shape {tuple(cond.shape)}. Use an HGR trained for this "
                                 "model's text encoder (HGRTrain trains one), or the concept redirector, which works "
                                 "with any model.")
            return
        if cond.ndim != 3 or cond.shape[-1] != d or cond.shape[1] % t:
            raise ValueError(f"{who}text HGR '{self.name}' reads text embeddings of width {d} in chunks of {t} "
                             f"tokens, got shape {tuple(cond.shape)}. Use an HGR trained for this model's text "
                             "encoder (HGRTrain trains one), or the concept redirector, which works with any model.")

    @property
    def train_cfg(self) -> float:
        """The guidance scale it was trained at (its teacher's cfg, from the file's training record; 5.0,
        the trainer's default, when the record has none): the cfg-1 form (:func:`cfg1_prediction`)
        reads it."""
        try:
            rec = json.loads(self.metadata.get("training") or "{}")
            w = float(rec.get("cfg", 5.0)) if isinstance(rec, dict) else 5.0
        except (ValueError, TypeError):
            w = 5.0
        return w if w > 1.0 else 5.0

    @property
    def rewrites(self) -> bool:
        """Whether this HGR also rewrites the prompt's own embedding (``config.rewrite``)."""
        return bool(self.config.rewrite)

    def _to(self, device) -> None:
        if next(self.net.parameters()).device != device:
            self.net.to(device)

    @frozen
    def rewrite_gate(self, cond: torch.Tensor) -> torch.Tensor:
        """Per prompt, how much of the rewrite applies: 0 -> 1 as the embedding distance rises between
        the two calibrated values of ``rewrite_gate`` (float32 ``(B,)``; zeros without a rewriter)."""
        if not self.rewrites:
            return torch.zeros(cond.shape[0], device=cond.device)
        self._to(cond.device)
        lo, hi = (float(v) for v in self.net.rewrite_gate)
        return ((self.distance(cond) - lo) / max(hi - lo, 1e-6)).clamp(0.0, 1.0)

    @frozen
    def rewrite(self, cond: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The prompt's embedding as the conditional branch should see it: ``c + gate(c) * min(s, 1) *
        Delta_r(c)``; ``cond`` itself (the same tensor) without a rewriter, at strength 0 or when no
        prompt of the batch opens the gate, and bit for bit for each prompt whose gate is closed. A
        non-finite result falls back to ``cond``."""
        self.check(cond)
        if not self.rewrites or strength <= 0:
            return cond
        self._to(cond.device)
        gate = self.rewrite_gate(cond) * min(float(strength), 1.0)
        if not bool((gate > 0).any()):
            return cond
        out = cond.float() + gate.view(-1, 1, 1) * self.net.rewriter(cond)
        keep = (gate <= 0) | ~torch.isfinite(out).flatten(1).all(dim=1)
        out = torch.where(keep.view(-1, 1, 1), cond.float(), out)
        return out.to(cond.dtype)

    @frozen
    def uncond(self, cond: torch.Tensor, strength: float = 1.0, base: torch.Tensor | None = None,
               rewritten: bool = True) -> torch.Tensor:
        """The unconditional embedding for ``cond``: ``base + strength * Delta(c)``. ``base`` is the
        empty-prompt embedding (default) or the user's own negative prompt's embedding: a negative
        prompt keeps working, and the HGR's correction is added to it. Token lengths are matched as
        ComfyUI matches them (both repeated to their least common multiple; the sequence layout instead
        maps the negative onto the prompt's positions, so the result has the prompt's length); a batch of one is
        broadcast. Same dtype and device as ``cond``; a non-finite result falls back to ``base``.

        With a rewriter (and ``rewritten``), ``Delta`` reads the *rewritten* prompt, the one the
        conditional branch sees, so that what the rewrite already made safe is not redirected twice;
        ``rewritten=False`` reads the prompt as given (the detector's harmful distance)."""
        self.check(cond)
        self._to(cond.device)
        if rewritten and self.rewrites:
            cond = self.rewrite(cond, strength)
        delta = self.net.delta(cond) * float(strength)
        base = (self.net.empty if base is None else base).to(cond.device, torch.float32)
        if base.ndim == 2:
            base = base[None]
        if base.ndim != 3 or base.shape[-1] != delta.shape[-1]:
            raise ValueError(f"text HGR '{self.name}': the negative embedding has shape {tuple(base.shape)}, "
                             f"the prompt's {tuple(cond.shape)}; both must come from the same text encoder")
        if base.shape[0] not in (1, delta.shape[0]) and delta.shape[0] != 1:
            raise ValueError(f"text HGR '{self.name}': {base.shape[0]} negative embeddings for {delta.shape[0]} "
                             "prompts; give one negative, or one per prompt")
        if self.config.layout == 1:  # the prompt's own length: the negative mapped onto its positions
            base = on_positions(base, cond)
            out = base + delta
        else:
            length = math.lcm(delta.shape[1], base.shape[1])
            base = base.repeat(1, length // base.shape[1], 1)
            out = base + delta.repeat(1, length // delta.shape[1], 1)
        bad = ~torch.isfinite(out).flatten(1).all(dim=1)
        if bad.any():
            out[bad] = base.expand_as(out)[bad]
        return out.to(cond.dtype)

    @frozen
    def distance(self, cond: torch.Tensor) -> torch.Tensor:
        """The harmful Euclidean distance on embeddings, one per prompt:
        ``||HGR(c) - e_empty|| / ||c - e_empty||`` (0 for a prompt the HGR leaves alone)."""
        self.check(cond)
        self._to(cond.device)
        e = self.net.empty_for(cond.float())
        d = self.net.delta(cond.float())
        return d.flatten(1).norm(dim=1) / (cond.float() - e).flatten(1).norm(dim=1).clamp_min(1e-6)


def cfg1_prediction(d_c: torch.Tensor, d_hgr: torch.Tensor, d_n: torch.Tensor, train_cfg: float) -> torch.Tensor:
    """The paper's HGR at cfg 1 (guidance-distilled models), where CFG's unconditional branch has no
    weight: the HGR was trained so that ``D(x, HGR(c)) = D_n + w / (w - 1) * (D_c - D_s)`` at its training
    scale ``w`` (``D_s``: the safe rewrite's prediction, ``D_n``: the empty or negative prompt's), so the
    safe prediction it stands for is ``D_s = D_c - (w - 1) / w * (D(x, HGR(c)) - D_n)``. With the strength
    already in ``HGR(c) = n + s * Delta(c)``, this is the cfg-1 output; ``d_hgr == d_n`` gives ``d_c``."""
    w = float(train_cfg)
    return d_c - (w - 1.0) / w * (d_hgr - d_n)


class TextHGRScorer:
    """A text HGR as a :class:`safecfg.redirect.Redirector` for detection on images *with the prompt*:
    its one concept row is ``D(x, HGR(c))``, and the guidance it gives is ``D_c - D(x, HGR(c))``, so the
    harmful Euclidean distance ``||R(g) - g|| / ||g||`` (``g = D_c - D(x, "")``) is measured on the
    model's scores as for the other redirectors. Without the prompt a text HGR has nothing to read."""

    kind = "text"
    num_concepts = 1

    def __init__(self, hgr: TextHGR):
        self.hgr = hgr
        self.names = list(hgr.names)
        self.detect_threshold = hgr.detect_threshold
        self.detect_levels = hgr.detect_levels

    def redirect(self, g, sigma, *, uncond=None, concept_preds=None, state=None):
        from .redirect import Redirection, hed

        if uncond is None or not concept_preds:
            raise ValueError(f"text HGR '{self.hgr.name}' scores an image only with its prompt: D(x, HGR(c)) is "
                             "needed")
        g_red = g + uncond - concept_preds[0]  # D_c - D(x, HGR(c))
        return Redirection(g_red, hed(g, g_red))
