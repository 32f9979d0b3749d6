"""SafeCFG inside ComfyUI's sampler: the guider (SamplerCustomAdvanced) and the model patch (KSampler).

Both redirect the guidance ``g = D_c - D_u`` by replacing the conditional prediction with
``D_c + s * (R(g) - g)``; ComfyUI's own ``cfg_function`` then forms ``D_u + w * R_s(g)`` and runs the
post-CFG hooks, so everything outside the redirection is core ComfyUI, and strength 0 or a step
outside the window is bit-identical to plain CFG.

A text-embedding HGR (the paper's form, ``redirector.kind == "text"``) changes the unconditional
branch's *conditioning* instead: inside the window the negative's text embedding becomes
``n + s * Delta(c)`` (``n`` the user's negative prompt, ``c`` the positive prompt's embedding),
computed once per run and prompt, never per step; outside it the negative is the user's own. A text
HGR with a rewriter (``redirector.rewrites``) also rewrites the positive's embedding inside the window
(gated per prompt by its harm distance, so a clean prompt's positive passes bit for bit), and its
``Delta`` then reads the rewritten prompt.
"""

from __future__ import annotations

import logging
import math
import uuid

import comfy.patcher_extension
import comfy.samplers
import node_helpers
import torch
from comfy.sampler_helpers import convert_cond

from ..safecfg.redirect import blend
from ..safecfg.text_hgr import cfg1_prediction
from .hgr_type import HGRHandle

log = logging.getLogger("SafeCFG")
CONCEPT_KEY = "safecfg_concept_{}"
TEXT_NEGATIVE_KEY = "safecfg_text_negative"
TEXT_POSITIVE_KEY = "safecfg_text_positive"
CONCEPT_POSITIVE_KEY = "safecfg_concept_positive"
#: a conditioning's token mask (Lumina 2, Z-Image, ...): a text HGR's unconditional embedding of the
#: sequence layout has the positive's length, so it takes the positive's mask
MASK_KEYS = ("attention_mask",)
#: the same in the model's own conditioning (``model_conds``) of a batched call
MODEL_MASK_KEYS = ("attention_mask", "num_tokens", "text_embedding_mask")


def is_text(handle: HGRHandle) -> bool:
    return getattr(handle.redirector, "kind", "") == "text"


def text_negative(handle: HGRHandle, positive, negative, strength: float, rewritten: bool = True) -> list:
    """The negative CONDITIONING a text HGR gives for ``positive``: each negative entry's embedding
    ``n`` becomes ``n + strength * Delta(c)``, ``c`` the first positive entry's embedding (a
    conditioning made of several entries, e.g. by Conditioning (Combine), is read through its first).
    Other keys (pooled output, areas, masks) are the negative's own. ``rewritten``: an HGR with a
    rewriter rewrites ``c`` first (sampling); False reads ``c`` as given (detection, or a positive
    that :func:`text_positive` already rewrote)."""
    if not positive:
        raise ValueError(f"SafeCFG: text HGR '{handle.name}' needs a positive prompt; the positive conditioning "
                         "is empty")
    c = positive[0][0]
    out = []
    for emb, extra in negative:
        new = handle.redirector.uncond(c.to(emb.device), strength, base=emb, rewritten=rewritten)
        extra = dict(extra)
        if new.shape[1] != emb.shape[1]:  # the sequence layout: the prompt's length, so the prompt's mask
            for k in MASK_KEYS:
                if k in positive[0][1]:
                    extra[k] = positive[0][1][k]
                else:
                    extra.pop(k, None)
        out.append([new, extra])
    return out


def text_positive(handle: HGRHandle, positive, strength: float) -> list:
    """The positive CONDITIONING a text HGR with a rewriter gives: each entry's embedding rewritten
    (the same entry, unchanged, where the gate is closed or the HGR has no rewriter)."""
    red = handle.redirector
    if not getattr(red, "rewrites", False):
        return positive
    out = []
    for emb, extra in positive:
        new = red.rewrite(emb, strength)
        out.append([emb, extra] if new is emb else [new, dict(extra)])
    return out


class Window:
    """The part of the schedule where SafeCFG acts, mirroring core's timestep ranges:
    active when ``sigma_end <= sigma <= sigma_start`` (and ``start_percent < end_percent``)."""

    def __init__(self, model_patcher, strength: float, start_percent: float, end_percent: float):
        ms = model_patcher.get_model_object("model_sampling")
        self.strength = float(strength)
        self.sigma_start = float(ms.percent_to_sigma(start_percent))
        self.sigma_end = float(ms.percent_to_sigma(end_percent))
        self.empty = self.strength == 0.0 or start_percent >= end_percent

    def active(self, sigma) -> bool:
        if self.empty:
            return False
        s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
        return self.sigma_end <= s <= self.sigma_start


def redirect_cond(handle: HGRHandle, strength: float, cond: torch.Tensor, uncond: torch.Tensor, sigma,
                  concept_preds=None, state: dict | None = None):
    """The conditional prediction whose CFG direction is ``R_s(g)``, and the per-sample HED.
    ``state``: this sampling run's dict for the redirector (fresh per run)."""
    g = cond - uncond
    r = handle.redirector.redirect(g, sigma, uncond=uncond, concept_preds=concept_preds, state=state)
    return blend(g, r.g_red, strength, base=cond), r.hed


def _calc(model, conds, x, timestep, model_options):
    fn = model_options.get("sampler_calc_cond_batch_function")
    if fn is not None:
        return fn({"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)


class SafeCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose guidance passes through an HGR. Positive, negative and every concept
    conditioning go through the model in one batched call."""

    def __init__(self, model_patcher, handle: HGRHandle, strength: float, start_percent: float, end_percent: float):
        super().__init__(model_patcher)
        self.handle = handle
        self.window = Window(model_patcher, strength, start_percent, end_percent)
        self.hed_trace: list[tuple[float, torch.Tensor]] = []
        self.run_state: dict = {}
        #: a text HGR's training cfg, for its cfg-1 form (read from the file's record once, not per step)
        self.train_cfg = handle.redirector.train_cfg if is_text(handle) else None

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        if is_text(self.handle) and not self.window.empty:
            conds[TEXT_POSITIVE_KEY] = text_positive(self.handle, positive, self.window.strength)
            # Delta reads the rewritten positive, rewritten once for both branches
            conds[TEXT_NEGATIVE_KEY] = text_negative(self.handle, conds[TEXT_POSITIVE_KEY], negative,
                                                     self.window.strength, rewritten=False)
        elif getattr(self.handle.redirector, "rewrites", False) and not self.window.empty:
            # the concept redirector's text stage: the positive rewritten once, used inside the window
            conds[CONCEPT_POSITIVE_KEY] = text_positive(self.handle, positive, self.window.strength)
        for i, c in enumerate(self.handle.concept_rows()):
            conds[CONCEPT_KEY.format(i)] = node_helpers.conditioning_set_values(c, {"prompt_type": "positive"})
        self.inner_set_conds(conds)

    def sample(self, *args, **kwargs):
        self.hed_trace = []
        self.run_state = {}
        return super().sample(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive = self.conds.get("positive", None)
        negative = self.conds.get("negative", None)
        if not self.window.active(timestep):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        if is_text(self.handle) and not is_cfg1(self.cfg):  # the paper's form: the HGR's negative, then core CFG
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds[TEXT_NEGATIVE_KEY],
                                                    self.conds[TEXT_POSITIVE_KEY], self.cfg,
                                                    model_options=model_options, seed=seed)
        if is_text(self.handle):  # at cfg 1: D_c, D(x, HGR(c)) and the negative's in one batched call
            pos, hgr_neg = self.conds[TEXT_POSITIVE_KEY], self.conds[TEXT_NEGATIVE_KEY]
            d_c, d_h, d_n = _calc(self.inner_model, [pos, hgr_neg, negative], x, timestep, model_options)
            cond_pred = cfg1_prediction(d_c, d_h, d_n, self.train_cfg)
            return comfy.samplers.cfg_function(self.inner_model, cond_pred, d_h, self.cfg, x, timestep,
                                               model_options=model_options, cond=pos, uncond=hgr_neg)
        positive = self.conds.get(CONCEPT_POSITIVE_KEY, positive)
        n_concepts = len(self.handle.concept_rows())
        concepts = [self.conds.get(CONCEPT_KEY.format(i)) for i in range(n_concepts)]
        out = _calc(self.inner_model, [positive, negative] + concepts, x, timestep, model_options)
        base_conds, base_out, concept_preds = [positive, negative], list(out[:2]), list(out[2:])
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": base_conds, "conds_out": base_out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            base_out = fn(args)
        cond_pred, uncond_pred = base_out[0], base_out[1]
        cond_pred, e = redirect_cond(self.handle, self.window.strength, cond_pred, uncond_pred, timestep,
                                     concept_preds or None, self.run_state)
        self.hed_trace.append((float(timestep.flatten()[0]), e.detach().cpu()))
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, timestep,
                                           model_options=model_options, cond=positive, uncond=negative)


def patch_model(model_patcher, handle: HGRHandle, strength: float, start_percent: float, end_percent: float):
    """A clone of ``model_patcher`` whose CFG goes through ``handle`` in any sampler (KSampler included).

    Built on the stacking pre-CFG hook list, so it composes with other guidance nodes. Concept
    conditionings join cond/uncond's batched model call through a CALC_COND_BATCH wrapper.
    Per-run state lives in a ``model_options`` sub-dict, which ComfyUI copies fresh for every run.
    """
    m = model_patcher.clone()
    window = Window(m, strength, start_percent, end_percent)
    if window.empty:
        return m
    if is_text(handle):
        return _patch_text(m, handle, window)
    key = f"safecfg_patch_{uuid.uuid4().hex[:12]}"
    m.model_options[key] = {}
    concept_conds = [convert_cond(c) for c in handle.concept_rows()]

    def encoded_concepts(model, x, state):
        if state.get("enc_shape") != tuple(x.shape) or state.get("enc_device") != x.device:
            enc = []
            for c in concept_conds:
                c = [dict(d, prompt_type="positive") for d in c]
                enc.append(comfy.samplers.encode_model_conds(model.extra_conds, c, x, x.device, "positive"))
            state.update(enc=enc, enc_shape=tuple(x.shape), enc_device=x.device)
        return state["enc"]

    rewrites = getattr(handle.redirector, "rewrites", False)

    def calc_wrapper(executor, model, conds, x_in, timestep, model_options):
        state = model_options.get(key)
        if state is None or state.get("evaluating_concepts") or not window.active(timestep):
            return executor(model, conds, x_in, timestep, model_options)
        if rewrites and conds and conds[0]:  # the text stage: the positive's embedding, once per run and prompt
            text_state = state.setdefault("text", {})
            conds = [_rewritten_positive(handle, conds[0], window.strength, text_state)] + list(conds[1:])
        if not concept_conds or len(conds) != 2 or conds[1] is None:
            return executor(model, conds, x_in, timestep, model_options)
        out = executor(model, list(conds) + encoded_concepts(model, x_in, state), x_in, timestep, model_options)
        state["concept_out"] = (x_in, out[2:])
        return out[:2]

    def pre_cfg(args):
        out, conds, sigma = args["conds_out"], args["conds"], args["sigma"]
        if len(out) < 2 or len(conds) < 2 or conds[1] is None or not window.active(sigma):
            return out
        concept_preds = None
        if concept_conds:
            state = args["model_options"].setdefault(key, {})
            got = state.pop("concept_out", None)
            if got is not None and got[0] is args["input"]:
                concept_preds = list(got[1])
            else:  # another guider made the batched call: evaluate the concepts here instead
                model = args["model"]
                state["evaluating_concepts"] = True  # keep calc_wrapper from treating this call as cond/uncond
                try:
                    concept_preds = comfy.samplers.calc_cond_batch(model, encoded_concepts(model, args["input"], state),
                                                                   args["input"], sigma, args["model_options"])
                finally:
                    state["evaluating_concepts"] = False
        run_state = args["model_options"].setdefault(key, {}).setdefault("redirector", {})
        cond, _ = redirect_cond(handle, window.strength, out[0], out[1], sigma, concept_preds, run_state)
        return [cond, out[1]] + list(out[2:])

    m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)
    if concept_conds or rewrites:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, calc_wrapper)
    return m



def _crossattn(entry):
    mc = entry.get("model_conds", {}) if isinstance(entry, dict) else {}
    c = mc.get("c_crossattn")
    return getattr(c, "cond", None)


def _with_crossattn(entry, emb, like=None):
    """``entry`` with its text embedding ``emb``; where ``emb``'s length differs from the entry's own and
    ``like`` (the positive's entry) is given, the token mask is ``like``'s."""
    import comfy.conds

    new = dict(entry)
    mc = dict(entry["model_conds"], c_crossattn=comfy.conds.CONDCrossAttn(emb))
    old = _crossattn(entry)
    if like is not None and old is not None and old.shape[1] != emb.shape[1]:
        src = like.get("model_conds", {})
        for k in MODEL_MASK_KEYS:
            if k in src:
                mc[k] = src[k]
            else:
                mc.pop(k, None)
    new["model_conds"] = mc
    return new


def _rewritten_positive(handle: HGRHandle, entries: list, strength: float, state: dict) -> list:
    """The batched call's positive entries with their text embedding rewritten by the handle's rewriter
    (a text HGR's, or the concept redirector's text stage), each computed once per run and prompt
    (cached in ``state``, the run's own dict)."""
    out = []
    for i, entry in enumerate(entries):
        p = _crossattn(entry)
        cache_key = ("positive", i, id(p), None if p is None else tuple(p.shape))
        if p is not None and cache_key not in state:
            state[cache_key] = handle.redirector.rewrite(p, strength)
        out.append(entry if p is None or state[cache_key] is p else _with_crossattn(entry, state[cache_key]))
    return out


def is_cfg1(cfg) -> bool:
    """ComfyUI's own test for cfg 1, where it skips the unconditional branch."""
    return math.isclose(float(cfg), 1.0)


def _patch_text(m, handle: HGRHandle, window: Window):
    """The text HGR as a model patch: a CALC_COND_BATCH wrapper that, inside the window, swaps the
    negative's text embedding for ``n + s * Delta(c)`` in the batched model call. ``Delta(c)`` is
    computed once per run and prompt (cached in the run's ``model_options``, which ComfyUI copies fresh
    for every run). At cfg 1 the sampler is asked to evaluate the negative too, and a pre-CFG hook
    evaluates the user's own negative (one more row) and gives the cfg-1 form
    (:func:`safecfg.text_hgr.cfg1_prediction`)."""
    key = f"safecfg_text_{uuid.uuid4().hex[:12]}"
    m.model_options[key] = {}
    rewrites = getattr(handle.redirector, "rewrites", False)
    train_cfg = handle.redirector.train_cfg  # read from the file's record once, not per step

    def pre_cfg(args):
        out, conds, sigma = args["conds_out"], args["conds"], args["sigma"]
        if (not is_cfg1(args["cond_scale"]) or len(out) < 2 or len(conds) < 2 or not conds[1]
                or not window.active(sigma)):
            return out
        state = args["model_options"].setdefault(key, {})
        state["cfg1"] = True  # from the next step on, the batched call evaluates the user's negative too
        got = state.pop("plain_out", None)
        if got is not None and got[0] is args["input"]:
            d_n = got[1]
        else:  # the first step (or another guider's call): the user's negative in a call of its own
            state["plain_negative"] = True  # this call evaluates the user's negative as it is
            try:
                (d_n,) = comfy.samplers.calc_cond_batch(args["model"], [conds[1]], args["input"], sigma,
                                                        args["model_options"])
            finally:
                state["plain_negative"] = False
        return [cfg1_prediction(out[0], out[1], d_n, train_cfg), out[1]] + list(out[2:])

    m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)

    def calc_wrapper(executor, model, conds, x_in, timestep, model_options):
        state = model_options.get(key)
        if state is not None and state.get("plain_negative"):
            return executor(model, conds, x_in, timestep, model_options)
        has_negative = len(conds) >= 2 and bool(conds[1])
        # at cfg 1 ComfyUI evaluates no negative (conds[1] is None): a rewriter still rewrites the positive
        if (state is None or not conds or not conds[0] or not (has_negative or rewrites)
                or not window.active(timestep)):
            return executor(model, conds, x_in, timestep, model_options)
        c = _crossattn(conds[0][0])
        if c is None:
            return executor(model, conds, x_in, timestep, model_options)
        poss = _rewritten_positive(handle, conds[0], window.strength, state) if rewrites else conds[0]
        if not has_negative:
            return executor(model, [poss] + list(conds[1:]), x_in, timestep, model_options)
        c_read = _crossattn(poss[0])  # Delta reads the rewritten positive (the same tensor without a rewriter)
        negs = []
        for i, entry in enumerate(conds[1]):
            n = _crossattn(entry)
            if n is None:
                negs.append(entry)
                continue
            cache_key = (i, id(c), tuple(c.shape), id(n), tuple(n.shape))
            if cache_key not in state:
                state[cache_key] = handle.redirector.uncond(c_read, window.strength, base=n.to(c.device),
                                                            rewritten=False)
            negs.append(_with_crossattn(entry, state[cache_key], like=poss[0]))
        if state.get("cfg1") and len(conds) == 2:  # cfg 1: the user's negative as a third row of the same call
            out = executor(model, [poss, negs, conds[1]], x_in, timestep, model_options)
            state["plain_out"] = (x_in, out[2])
            return out[:2]
        return executor(model, [poss, negs] + list(conds[2:]), x_in, timestep, model_options)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, calc_wrapper)
    return m
