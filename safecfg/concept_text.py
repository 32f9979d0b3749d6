"""The concept redirector's text stage: harmful words redirected in the prompt's token embedding.

The latent stage of the concept redirector (:class:`safecfg.redirect.ConceptRedirector`) compares the
CFG direction with each concept's direction ``D(x, c_k) - D_u``. Those directions show the concept
alone, drawn where the model draws a lone object; a harmful object beside a clean one, or placed
elsewhere, matches them poorly. The text stage acts before the model instead, on the prompt's text
embedding ``e`` (``(B, T, width)``, one vector per token position), where an object is a word wherever
it stands.

It is built from the concept lines alone, with the sampler's text encoder: every harmful phrase ``h``
of a line is encoded in a few generic contexts (``h``, ``a h``, ``a red h``: chosen on the toy world's
calibration split, where the third context halved what passed in composed prompts), and so is its
safe counterpart ``s`` (the line's ``-> s``). Each token position where the two encodings differ
(the phrase's tokens, and the positions after it that read it) gives an **anchor**: the harmful
vector, centred on the empty prompt's embedding at that position (``a = e_h - e_0``), and its
**offset** ``d = e_h - e_s``. A line without ``->`` has no safe phrase to move to, and the text
stage leaves it to the latent stage: moving its tokens to the empty prompt's instead
(``build(..., erase=True)``) let 71 % of the toy world's single harmful calibration prompts through
(against 0 % with ``-> spoon`` / ``-> circle``), since a prompt whose object word is blanked still
draws some object, often the harmful one.

On a prompt, each position's centred vector is compared (cosine) with every anchor; where the best
match passes ``start`` the gate opens, fully at ``full``, and the position moves by ``gate x strength
x`` that anchor's offset, scaled down where the position matches the same anchor's *safe* vector
nearly as well (a margin below ``MARGIN``): a word that is near every vector at its place, such as
the colour before the object, is as near the safe one. A prompt whose every position stays below
``start`` is returned as the same tensor, bit for bit. That is not every clean prompt: the positions
that only read a phrase (the end tokens after "a red knife") look alike across short prompts. On the
toy world's calibration split, at ``start`` 0.85, the stage touched 23 of 80 clean prompts, none of
them fully (30 without the margin), and all 80 harmful ones (73 fully); clean accuracy 81.2 % with
the text stage alone against plain CFG's 80.0 %, mean pixel distance to plain CFG 0.000. Requiring the
harmful word itself to match before any position moves left 3 of 80 clean prompts touched but 11 of 80
harmful ones untouched (the toy encoder's vector for a word depends on the words before it), so it
was not kept. Computed once per prompt and run, never per step.

Encoders whose outputs vary in length with the prompt (Z-Image's Qwen3, Qwen-Image's Qwen2.5-VL,
HiDream's Llama, Lumina 2's Gemma: a chat template around the words) cannot be compared position by
position; for them positions are matched by :func:`align` (the template's shared prefix position by
position, its tail right-aligned), when building the anchors as when centring a prompt. Fixed-length
encoders (CLIP's 77-token chunks, Flux's and SD3's padded T5) keep the position-by-position form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .redirect import inference_grad

#: the contexts each harmful and safe phrase is encoded in (generic: no model's own caption style)
CONTEXTS = ("{}", "a {}", "a red {}")
#: a position is an anchor where the harmful and safe encodings differ by this share of the vector
ANCHOR_SHARE = 0.3
#: the gate opens fully only where a position matches an anchor by this much more than its safe vector
MARGIN = 0.1


def align(length: int, ref: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """For encoders whose outputs vary in length (Qwen, Llama and Gemma-based ones, with a chat template
    around the words): the position of ``ref`` (T_ref, width) that stands for each of ``length``
    positions of another encoding ``x``. The common prefix (where ``x`` equals ``ref``: the template
    before the words, as a causal encoder reads it) maps position by position, the rest right-aligned
    (the template's tail after the words), a longer middle clipped to the first position after the
    prefix. Equal lengths and no prefix give the identity."""
    t_ref = ref.shape[0]
    p = 0
    if x is not None:
        n = min(length, t_ref)
        same = torch.isclose(x[:n].float(), ref[:n].float(), rtol=1e-4, atol=1e-5).all(-1)
        p = min(int(same.long().cumprod(0).sum()), t_ref - 1)
    idx = torch.arange(length, device=ref.device)
    shifted = (idx - (length - t_ref)).clamp(min=p, max=t_ref - 1)
    return torch.where(idx < p, idx, shifted)


class TextConceptStage:
    """Per-token redirection of harmful concepts in a text embedding (see the module docstring).

    ``anchors`` (N, width) unit vectors, ``offsets`` (N, width), ``empty`` (T, width) the empty
    prompt's embedding; ``lines`` (N,) the concept line of each anchor (for reports)."""

    def __init__(self, anchors: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor, lines: Sequence[int],
                 start: float = 0.85, full: float = 0.92, names: Sequence[str] = (), variable_length: bool = False):
        if anchors.ndim != 2 or anchors.shape != offsets.shape or empty.ndim != 2 or empty.shape[1] != anchors.shape[1]:
            raise ValueError(f"text concept stage: anchors {tuple(anchors.shape)}, offsets {tuple(offsets.shape)} and "
                             f"empty embedding {tuple(empty.shape)} do not fit together")
        if anchors.shape[0] == 0:
            raise ValueError("text concept stage: no anchor (the harmful and safe phrases encode the same)")
        if not -1.0 <= start < full <= 1.0:
            raise ValueError(f"text concept stage: need -1 <= start < full <= 1, got start {start}, full {full}")
        self.anchors = F.normalize(anchors.float(), dim=1)
        self.offsets = offsets.float()
        #: each anchor's safe counterpart (``e_s - e_0``, unit): a position must match the harmful vector
        #: better than it matches the safe one
        self.safe = F.normalize((anchors - offsets).float(), dim=1)
        self.empty = empty.float()
        self.lines = torch.as_tensor(list(lines), dtype=torch.long)
        self.start, self.full = float(start), float(full)
        self.names = list(names)
        #: the encoder's outputs vary in length: positions are centred on the empty prompt's through
        #: :func:`align` instead of position by position (chunk by chunk)
        self.variable_length = bool(variable_length)

    @classmethod
    def build(cls, encode: Callable[[str], torch.Tensor], lines: Sequence[Sequence[str]],
              targets: Sequence[str | None], *, start: float = 0.85, full: float = 0.92,
              names: Sequence[str] = (), erase: bool = False) -> TextConceptStage | None:
        """``encode(text)`` -> (T, width) the text encoder's output for one prompt; ``lines`` the harmful
        phrases of each concept line, ``targets`` each line's safe phrase (None: erase; such a line is
        left to the latent stage unless ``erase``, see the module docstring). None when no line is
        left. Positions are compared as they stand: where the safe phrase has fewer tokens, the
        harmful phrase's extra tokens are taken to what follows the safe phrase (its end token), as a
        prompt of the safe phrase would read."""
        empty = encode("").float()
        pairs = []
        for k, (phrases, target) in enumerate(zip(lines, targets)):
            if target is None and not erase:
                continue
            for phrase in phrases:
                for ctx in CONTEXTS:
                    # erase: the positions the phrase changes (against the context without it) go to the
                    # empty prompt's vectors
                    e_h = encode(ctx.format(phrase)).float()
                    e_s = encode(ctx.format(target) if target is not None else ctx.split("{}")[0].strip()).float()
                    pairs.append((k, e_h, e_s, target is None))
        if not pairs:
            return None
        # a fixed-length encoder (CLIP's 77-token chunks, Flux's padded T5) compares positions as they
        # stand; one whose outputs vary in length aligns them (:func:`align`)
        variable = any(e.shape != empty.shape for _, e_h, e_s, _ in pairs for e in (e_h, e_s))
        anchors, offsets, owner = [], [], []
        for k, e_h, e_s, erased in pairs:
            e0 = empty[align(e_h.shape[0], empty, e_h)] if variable else empty
            if variable:
                e_s = e_s[align(e_h.shape[0], e_s, e_h)]
            keep = (e_h - e_s).norm(dim=1) > ANCHOR_SHARE * e_h.norm(dim=1)
            target_vec = e0 if erased else e_s
            anchors.append((e_h - e0)[keep])
            offsets.append((e_h - target_vec)[keep])
            owner += [k] * int(keep.sum())
        return cls(torch.cat(anchors), torch.cat(offsets), empty, owner, start, full, names, variable_length=variable)

    def gate(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position of ``emb`` (B, T, width): the gate in [0, 1] and the best anchor's index."""
        if emb.ndim != 3 or emb.shape[-1] != self.anchors.shape[1]:
            raise ValueError(f"text concept stage: expected a (batch, tokens, {self.anchors.shape[1]}) text embedding, "
                             f"got {tuple(emb.shape)}; build the concept redirector with the sampled model's CLIP")
        empty = self.empty.to(emb.device)
        t = emb.shape[1]
        if self.variable_length:  # each prompt's positions centred on the empty prompt's, aligned
            empty = torch.stack([empty[align(t, empty, e)] for e in emb])
        elif t != empty.shape[0]:  # several 77-token chunks: the empty prompt's chunk repeated
            reps = -(-t // empty.shape[0])
            empty = empty.repeat(reps, 1)[:t]
        x = F.normalize(emb.float() - empty, dim=-1)
        best, idx = (x @ self.anchors.to(emb.device).T).max(-1)
        g = ((best - self.start) / (self.full - self.start)).clamp(0.0, 1.0)
        # the margin over the same anchor's safe vector: a word that is near every vector at its place
        # (a colour before the object) is as near the safe one, the harmful word is not
        to_safe = (x * self.safe.to(emb.device)[idx]).sum(-1)
        g = g * ((best - to_safe) / MARGIN).clamp(0.0, 1.0)
        return g, idx

    def matches(self, emb: torch.Tensor) -> torch.Tensor:
        """(B,) the largest gate of each prompt: 0 where the stage leaves it unchanged."""
        with inference_grad(emb):
            return self.gate(emb)[0].amax(dim=1)

    def rewrite(self, emb: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``emb`` with every matched position moved by its anchor's offset (``gate x strength``); the
        same tensor where nothing matches or ``strength`` is 0."""
        if strength == 0.0:
            return emb
        with inference_grad(emb):
            g, idx = self.gate(emb)
            if not bool((g > 0).any()):
                return emb
            move = g.unsqueeze(-1) * self.offsets.to(emb.device)[idx]
            return (emb.float() - float(strength) * move).to(emb.dtype)
