"""Training the text-embedding HGR (the paper's form) with the base model frozen. Plain torch.

The base model enters through a :class:`TextTeacher` (``nodes/teacher.py`` implements it for a ComfyUI
MODEL + CLIP). Teacher states are the base model's own plain-CFG trajectories (as for the latent
HGR). At a state ``x`` of prompt ``p`` with guidance scale ``w``, ComfyUI's CFG gives
``D_u + w (D_c - D_u)``; with the HGR the unconditional prediction is ``D(x, HGR(c))``. The target:

- clean prompts: ``D(x, HGR(c)) = D(x, "")``, so the image is plain CFG's;
- harmful prompts: the guided output equals plain CFG's guided output *on the safe rewrite* ``S(p)``
  at the same ``x``: ``D(x, HGR(c)) = D_e + w / (w - 1) * (D_c - D_s)``, with ``D_c = D(x, p)``,
  ``D_s = D(x, S(p))``, ``D_e = D(x, "")`` (solve ``u + w (D_c - u) = D_e + w (D_s - D_e)`` for
  ``u``).

The loss is the squared error of ``D(x, HGR(c))`` against that target, relative to the size of the
guidance ``D_c - D_e`` at the state (so that every noise level counts alike), backpropagated through
the frozen denoiser into the HGR.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .prompts import PromptData
from .text_hgr import TextHGR, TextHGRConfig, TextHGRNet

log = logging.getLogger("SafeCFG")
#: the sequence layout's positional table covers at least this many tokens (longer prompts share its last row)
SEQUENCE_TOKENS = 256


class TextTeacher(Protocol):
    latent_channels: int

    def trajectories(self, prompts: list[str], seed: int, steps: int, cfg: float,
                     negatives: torch.Tensor | None = None) -> tuple[list, torch.Tensor]:
        """As :class:`safecfg.teacher_cache.Teacher`; ``negatives`` (B, T, D): the unconditional
        branch's text embeddings instead of the empty prompt's."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[list[str]]) -> list[torch.Tensor]:
        """As :class:`safecfg.teacher_cache.Teacher`."""

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The text embeddings ``(B, T, D)`` of ``prompts`` (constants)."""

    def denoise_embedding(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``D(x, context)`` for text embeddings ``context`` (B, T, D), differentiable in ``context``."""


@dataclass
class TextStatesSpec:
    states_per_trajectory: int = 4
    steps: int = 20
    cfg: float = 5.0
    batch: int = 32
    seed: int = 0


def unconditional_target(d_c: torch.Tensor, d_s: torch.Tensor, d_e: torch.Tensor, cfg: float) -> torch.Tensor:
    """The unconditional prediction under which CFG at scale ``cfg`` on the prompt gives plain CFG's
    output on the safe rewrite: ``D_e + cfg / (cfg - 1) * (D_c - D_s)`` (``D_e`` when ``D_s = D_c``)."""
    if cfg <= 1.0:
        raise ValueError(f"the text HGR's target needs a guidance scale above 1, got {cfg}")
    return d_e + cfg / (cfg - 1.0) * (d_c - d_s)


def build_states(teacher: TextTeacher, data: PromptData, spec: TextStatesSpec, *,
                 policy: TextHGR | None = None, round_: int = 0,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Teacher states for every prompt of ``data``: ``x``, ``sigma``, ``prompt`` (an index into
    ``texts``), ``target`` (the unconditional target), ``scale`` (``|D_c - D_e|^2`` per state),
    ``harmful``; plus ``embeddings`` (one per text). Harmful and clean prompts are interleaved.

    ``policy``: a text HGR whose own guided trajectories give the states (on-policy, DAgger-style):
    the states a partly redirected sample really passes through, each with the same target, so that
    the HGR learns to finish such a sample into the safe image. ``round_`` > 0 draws other noise (the
    prompts' order, hence ``embeddings``, stays the same, so rounds can be merged)."""
    items = [(h, s) for h, s in zip(data.harmful, data.safe)] + [(c, c) for c in data.clean]
    random.Random(spec.seed).shuffle(items)
    texts = list(dict.fromkeys(p for p, _ in items))
    index = {t: i for i, t in enumerate(texts)}
    rec: dict[str, list] = {k: [] for k in ("x", "sigma", "prompt", "target", "scale", "harmful")}
    units = [items[i:i + spec.batch] for i in range(0, len(items), spec.batch)]
    for u, unit in enumerate(units):
        if should_stop and should_stop():
            raise InterruptedError("the text HGR's teacher states were cancelled; run again")
        if progress:
            progress(u, len(units))
        prompts, safes = [p for p, _ in unit], [s for _, s in unit]
        seed = spec.seed * 100_003 + u + round_ * 7_919
        gen = torch.Generator().manual_seed(seed)
        if policy is None:
            states, _ = teacher.trajectories(prompts, seed, spec.steps, spec.cfg)
        else:
            states, _ = teacher.trajectories(prompts, seed, spec.steps, spec.cfg,
                                             negatives=policy.uncond(teacher.embed(prompts)))
        picks = sorted(torch.randperm(len(states), generator=gen)[:spec.states_per_trajectory].tolist())
        for i in picks:
            x, sigma = states[i]
            d_c, d_s, d_e = teacher.denoise(x, sigma, [prompts, safes, [""] * len(prompts)])
            rec["x"].append(x.float())
            rec["sigma"].append(sigma.float().flatten())
            rec["prompt"].append(torch.tensor([index[p] for p in prompts]))
            rec["target"].append(unconditional_target(d_c.float(), d_s.float(), d_e.float(), spec.cfg))
            rec["scale"].append((d_c.float() - d_e.float()).flatten(1).pow(2).mean(1))
            rec["harmful"].append(torch.tensor([p != s for p, s in unit]))
    if progress:
        progress(len(units), len(units))
    out = {k: torch.cat(v) for k, v in rec.items()}
    if hasattr(teacher, "embed_padded"):  # any lengths: padded, with each prompt's token count
        emb, lengths = teacher.embed_padded(texts)
        out["embeddings"], out["lengths"] = emb.float(), lengths.long()
    else:
        out["embeddings"] = torch.cat([teacher.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)]).float()
    return out


@dataclass
class TextFitSpec:
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    eval_every: int = 100
    patience: int = 8
    seed: int = 0


def _val_split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """``items`` shuffled by ``seed``, split into a validation share (at least one item when
    ``fraction`` > 0 and there are two or more) and the rest."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = max(1, int(len(items) * fraction)) if fraction > 0 and len(items) > 1 else 0
    return items[:n_val], items[n_val:]


def relative_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-state squared error relative to the guidance's size at the state, ``(B,)``."""
    return (pred.float() - target).flatten(1).pow(2).mean(1) / scale.clamp_min(1e-6)


def fit_text_hgr(teacher: TextTeacher, states: dict[str, torch.Tensor], config: TextHGRConfig,
                 empty: torch.Tensor, spec: TextFitSpec, *, family: str = "", categories: list[str] | None = None,
                 init: TextHGRNet | None = None,
                 progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[TextHGR, dict]:
    """Fit a text HGR to ``states`` (from :func:`build_states`), keeping the weights with the best
    validation loss (a split of the prompts, not of the states); stops early after ``patience``
    evaluations without improvement; ``init``: weights to start from (a previous round's). Returns the
    HGR and a summary (losses, the identity's loss: the untrained HGR's)."""
    # some denoisers add in place to tensors that autograd saved (ComfyUI's Flux blocks: ``x += ...``
    # after a norm read ``x``): under this context such a tensor is copied on mutation, so the
    # gradient reaches the HGR through any of them
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
        states = {k: v.clone() for k, v in states.items()}  # plain tensors (inputs may be inference tensors)
        return _fit(teacher, states, config, empty.clone(), spec, family, categories, init, progress, should_stop)


def _fit(teacher, states, config, empty, spec, family, categories, init, progress, should_stop):
    torch.manual_seed(spec.seed)
    net = TextHGRNet(config, empty)
    val_prompts, _ = _val_split(states["prompt"].unique().tolist(), spec.val_fraction, spec.seed)
    val_prompts = set(val_prompts)
    is_val = torch.tensor([int(p) in val_prompts for p in states["prompt"]])
    train_idx, val_idx = (~is_val).nonzero().flatten(), is_val.nonzero().flatten()
    if len(train_idx) == 0:
        train_idx = val_idx
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)

    lengths = states.get("lengths")
    full = states["embeddings"].shape[1]

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        p = states["prompt"][idx]
        n = lengths[p] if lengths is not None else torch.full((len(idx),), full)
        sels, losses = [], []
        for length in n.unique().tolist():  # prompts of one token count per model call
            sel = (n == length).nonzero().flatten()
            c = states["embeddings"][p[sel], :length]
            pred = teacher.denoise_embedding(states["x"][idx[sel]], states["sigma"][idx[sel]], net(c))
            sels.append(sel)
            losses.append(relative_loss(pred, states["target"][idx[sel]], states["scale"][idx[sel]]))
        if len(losses) == 1:
            return losses[0]
        return torch.cat(losses)[torch.argsort(torch.cat(sels))]  # back in the order of ``idx``

    def evaluate(idx: torch.Tensor) -> float:
        net.eval()
        with torch.no_grad():
            losses = [loss_on(idx[i:i + spec.batch]) for i in range(0, len(idx), spec.batch)]
        net.train()
        return float(torch.cat(losses).mean()) if losses else math.nan

    eval_idx = val_idx if len(val_idx) else train_idx
    identity = evaluate(eval_idx)
    start = identity
    if init is not None:
        net.load_state_dict(init.state_dict())
        start = evaluate(eval_idx)
    best, best_state, bad, step, history = start, {k: v.clone() for k, v in net.state_dict().items()}, 0, 0, []
    net.train()
    for step in range(1, spec.steps + 1):
        if should_stop and should_stop():
            raise InterruptedError("text HGR training was cancelled")
        idx = train_idx[torch.randint(0, len(train_idx), (min(spec.batch, len(train_idx)),), generator=gen)]
        loss = loss_on(idx).mean()
        # gradients for the HGR's parameters only: the frozen denoiser's weights never get a .grad, and
        # a rewriter (an initial HGR's, refitted by add_rewriter afterwards) is not part of this loss
        params = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("rewriter.")]
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if progress:
            progress(step, spec.steps, float(loss.detach()))
        if step % spec.eval_every == 0 or step == spec.steps:
            v = evaluate(eval_idx)
            history.append((step, v))
            if v < best:
                best, bad = v, 0
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= spec.patience:
                    break
    net.load_state_dict(best_state)
    hgr = TextHGR(net.eval(), family=family, categories=categories)
    summary = {"steps": step, "val_loss": best, "identity_val_loss": identity, "start_val_loss": start,
               "history": history,
               "train_states": len(train_idx), "val_states": len(val_idx)}
    return hgr, summary


def json_safe(text) -> dict:
    """A file's JSON training record as a dict (``{}`` when absent or unreadable)."""
    import json

    try:
        d = json.loads(text) if isinstance(text, str) else (text or {})
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def merge_states(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Teacher states of several rounds of the same prompts (:func:`build_states`) as one set."""
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in ("embeddings", "lengths")}
    out["embeddings"] = parts[0]["embeddings"]
    if "lengths" in parts[0]:
        out["lengths"] = parts[0]["lengths"]
    return out


def _weights_digest(net: TextHGRNet) -> str:
    from .teacher_cache import digest

    return digest([f"{float(v.double().sum()):.9e}" for v in net.state_dict().values()])


def train_text_hgr(teacher: TextTeacher, data: PromptData, cache_dir, out_path, *, spec: TextStatesSpec | None = None,
                   fit_spec: TextFitSpec | None = None, width: int = 256, base_model: str = "", family: str = "",
                   on_policy_rounds: int = 0, round_fit_steps: int | None = None, init: TextHGR | None = None,
                   notes: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, layout: int = 0) -> tuple[TextHGR, dict]:
    """Teacher states (cached in ``cache_dir/text_states.safetensors``, rebuilt when the prompts, the
    settings or the model change) -> fit -> validated ``.safetensors``. ``progress(stage, done, total)``
    with stages ``"teacher states"`` and ``"fit"``; ``notes`` join the file's training record. A cancelled
    run keeps the states: rerun to resume.

    ``on_policy_rounds`` > 0 (DAgger-style): after the first fit, each round samples the prompts
    *with the HGR fitted so far*, adds those states (same targets) to the set and fits again from the
    current weights (``round_fit_steps``, default half of ``fit_spec.steps``). Each round's states are
    cached too, keyed by the weights they were sampled with. ``init``: an already fitted text HGR for
    these prompts, which replaces the first fit (the rounds start from it). ``layout``: the text
    encoder's token layout (:class:`safecfg.text_hgr.TextHGRConfig`; 0: CLIP chunks, 1: a sequence)."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from .hgr_file import load_hgr, save_hgr
    from .teacher_cache import cache_metadata, digest

    spec, fit_spec = spec or TextStatesSpec(), fit_spec or TextFitSpec()
    cache_dir, out_path = Path(cache_dir), Path(out_path)
    fp = digest({"spec": spec.__dict__, "data": data.__dict__, "model": teacher.fingerprint()})

    def cached(name: str, key: str, make, stage: str):
        path = cache_dir / name
        if path.is_file() and cache_metadata(path).get("fingerprint") == key:
            return load_file(str(path))
        states = make(lambda d, t: progress(stage, d, t)) if progress else make(None)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in states.items()}, str(tmp), metadata={"fingerprint": key})
        os.replace(tmp, path)
        return states

    parts = [cached("text_states.safetensors", fp, lambda cb: build_states(
        teacher, data, spec, should_stop=should_stop, progress=cb), "teacher states")]
    empty = teacher.empty_embedding()
    n_empty = int(empty.shape[0])
    if layout == 1:  # the whole sequence: a positional table of at least SEQUENCE_TOKENS positions
        tokens = max(n_empty, SEQUENCE_TOKENS)
        config = TextHGRConfig(embed_dim=int(empty.shape[-1]), tokens=tokens, width=width, layout=1,
                               empty_tokens=n_empty if n_empty != tokens else 0)
    else:
        config = TextHGRConfig(embed_dim=int(empty.shape[-1]), tokens=n_empty, width=width)
    if init is not None:
        if (init.config.embed_dim, init.config.tokens, init.config.layout, init.config.empty_length) != (
                config.embed_dim, config.tokens, config.layout, config.empty_length):
            raise ValueError(f"the initial text HGR reads {init.config.embed_dim}-wide embeddings (layout "
                             f"{init.config.layout}, {init.config.tokens} tokens); this model's are "
                             f"{config.embed_dim} wide (layout {config.layout}, {config.tokens} tokens)")
        config, hgr = init.config, TextHGR(init.net, family=family, categories=data.category_names)
        summary = {"init": init.name, **json_safe(init.metadata.get("training"))}
    else:
        hgr, summary = fit_text_hgr(teacher, parts[0], config, empty, fit_spec, family=family,
                                    categories=data.category_names, should_stop=should_stop,
                                    progress=(lambda s, t, loss: progress("fit", s, t)) if progress else None)
    rounds = []
    for r in range(1, on_policy_rounds + 1):
        policy = hgr
        key = digest({"base": fp, "round": r, "policy": _weights_digest(policy.net)})
        parts.append(cached(f"text_states_on_policy_{r}.safetensors", key, lambda cb: build_states(  # noqa: B023
            teacher, data, spec, policy=policy, round_=r, should_stop=should_stop, progress=cb),  # noqa: B023
            f"on-policy states {r}"))
        steps = round_fit_steps or max(1, fit_spec.steps // 2)
        hgr, s_r = fit_text_hgr(teacher, merge_states(parts), config, empty, replace(fit_spec, steps=steps),
                                family=family, categories=data.category_names, init=policy.net,
                                should_stop=should_stop,
                                progress=(lambda s, t, loss, r=r: progress(f"fit {r + 1}", s, t)) if progress else None)
        rounds.append({k: v for k, v in s_r.items() if k != "history"})
    states = merge_states(parts)
    summary.update(kind="text", states=int(states["x"].shape[0]), cfg=spec.cfg, trajectory_steps=spec.steps,
                   on_policy_rounds=rounds, **(notes or {}))
    save_hgr(out_path, hgr, base_model=base_model, training=summary)
    load_hgr(out_path)  # what was written must load and validate
    return hgr, summary


@dataclass
class RewriteSpec:
    steps: int = 1500
    batch: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    #: where the gate opens, between the clean prompts' largest embedding distance (its ``clean_quantile``)
    #: and the harmful prompts' smallest (``harmful_quantile``): ``open_at`` of the way from one to the other
    clean_quantile: float = 0.99
    harmful_quantile: float = 0.02
    open_at: float = 0.5


def add_rewriter(hgr: TextHGR, embed: Callable[[list[str]], torch.Tensor], data: PromptData,
                 spec: RewriteSpec | None = None, *,
                 progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[TextHGR, dict]:
    """A copy of the text HGR ``hgr`` with a rewriter of the prompt's own embedding (see
    :class:`TextHGRNet`): ``c + Delta_r(c)`` fitted to the embedding of the safe rewrite for harmful
    prompts and to ``c`` itself for clean ones (squared error over all tokens; the text encoder is
    only read, its embeddings are constants). The paper's HGR is kept as it is.

    The gate: the paper's HGR's embedding distance on the training prompts; it is closed up to the
    clean prompts' ``clean_quantile`` and fully open ``open_at`` of the way to the harmful prompts'
    ``harmful_quantile`` (clean prompts far from every harmful one keep their embedding bit for bit).
    Returns the HGR and a summary (losses, gate, the distances it was set from)."""
    spec = spec or RewriteSpec()
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_rewriter(hgr, embed, data, spec, progress, should_stop)


def _fit_rewriter(hgr, embed, data, spec, progress, should_stop):
    torch.manual_seed(spec.seed)
    config = replace(hgr.config, rewrite=1)
    net = TextHGRNet(config, hgr.net.empty.detach().clone())
    missing, unexpected = net.load_state_dict({k: v.detach().clone() for k, v in hgr.net.state_dict().items()},
                                              strict=False)
    if unexpected or any(not (k.startswith("rewriter.") or k == "rewrite_gate") for k in missing):
        raise ValueError(f"the text HGR's weights do not fit its architecture (missing {missing}, "
                         f"unexpected {unexpected})")
    src = list(data.harmful) + list(data.clean)
    dst = list(data.safe) + list(data.clean)
    harmful = torch.tensor([True] * len(data.harmful) + [False] * len(data.clean))

    def embed_all(texts):
        return torch.cat([embed(texts[i:i + 64]).detach().float().clone() for i in range(0, len(texts), 64)])

    with torch.no_grad():
        e_src, e_dst = embed_all(src), embed_all(dst)
    val, train = _val_split(range(len(src)), spec.val_fraction, spec.seed)
    val_idx, train_idx = torch.tensor(val, dtype=torch.long), torch.tensor(train, dtype=torch.long)
    if len(train_idx) == 0:
        train_idx = val_idx
    # each prompt's error relative to how far its rewrite moves it (clean prompts: to the mean move)
    move = (e_dst - e_src).flatten(1).pow(2).mean(1)
    scale = torch.where(harmful, move, move[harmful].mean() if harmful.any() else torch.ones(()))
    params = list(net.rewriter.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)

    def loss_on(idx):
        pred = e_src[idx] + net.rewriter(e_src[idx])
        return (pred - e_dst[idx]).flatten(1).pow(2).mean(1) / scale[idx].clamp_min(1e-12)

    def evaluate(idx):
        with torch.no_grad():
            return float(torch.cat([loss_on(idx[i:i + 256]) for i in range(0, len(idx), 256)]).mean())

    eval_idx = val_idx if len(val_idx) else train_idx
    identity = evaluate(eval_idx)
    best, best_state = identity, {k: v.clone() for k, v in net.rewriter.state_dict().items()}
    step = 0
    for step in range(1, spec.steps + 1):
        if should_stop and should_stop():
            raise InterruptedError("the text HGR's rewriter training was cancelled")
        idx = train_idx[torch.randint(0, len(train_idx), (min(spec.batch, len(train_idx)),), generator=gen)]
        loss = loss_on(idx).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if progress:
            progress(step, spec.steps, float(loss.detach()))
        if step % 100 == 0 or step == spec.steps:
            v = evaluate(eval_idx)
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in net.rewriter.state_dict().items()}
    net.rewriter.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():  # the paper's HGR's distance (the file without a rewriter: the gate's input)
        dist = torch.cat([hgr.distance(e_src[i:i + 256]) for i in range(0, len(src), 256)])
    d_clean = float(torch.quantile(dist[~harmful], spec.clean_quantile)) if (~harmful).any() else 0.0
    d_harm = float(torch.quantile(dist[harmful], spec.harmful_quantile)) if harmful.any() else d_clean + 1.0
    lo = d_clean
    hi = max(lo + spec.open_at * (d_harm - lo), lo * 1.01 + 1e-6)
    net.rewrite_gate.copy_(torch.tensor([lo, hi]))
    out = TextHGR(net, family=hgr.family, categories=hgr.categories, name=hgr.name)
    out.detect_threshold = hgr.detect_threshold
    summary = {"steps": step, "val_loss": best, "identity_val_loss": identity, "gate": [lo, hi],
               "clean_distance_quantile": d_clean, "harmful_distance_quantile": d_harm,
               "prompts": len(src), "val_prompts": len(val_idx)}
    return out, summary
