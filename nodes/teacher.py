"""The base model as an HGR teacher: ComfyUI's sampler and batched model calls behind the
:class:`safecfg.teacher_cache.Teacher` interface."""

from __future__ import annotations

import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy.sampler_helpers import convert_cond


class ComfyTeacher:
    """Plain-CFG trajectories and batched denoised predictions of a ComfyUI MODEL + CLIP."""

    def __init__(self, model_patcher, clip, *, width: int = 64, height: int = 64, sampler: str = "euler",
                 scheduler: str = "normal", frames: int = 3):
        self.mp, self.clip = model_patcher, clip
        lf = model_patcher.model.latent_format
        self.latent_format = type(lf).__name__
        self.latent_channels = int(getattr(lf, "latent_channels", 4))
        self.width, self.height = width, height
        #: a model whose latents have a time axis samples clips of ``frames`` latent frames (Wan: 4k + 1
        #: video frames make k + 1); an image family on such latents (Qwen-Image) samples one frame
        self.latent_frames = 0
        if int(getattr(lf, "latent_dimensions", 2)) == 3:
            from .hgr_type import IMAGES_ON_VIDEO_VAE, model_family

            self.latent_frames = 1 if model_family(model_patcher) in IMAGES_ON_VIDEO_VAE else max(1, int(frames))
        self.sampler, self.scheduler = sampler, scheduler
        self._conds: dict[str, list] = {}

    def fingerprint(self) -> str:
        """Identifies the model a teacher cache was made with (cheap: per-tensor sums of the UNet, its
        patches, one text embedding and the sampling settings), so a cache of another checkpoint is
        never reused."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib
            import json

            h = hashlib.sha256(json.dumps([self.latent_format, self.width, self.height, self.sampler,
                                           self.scheduler] + ([self.latent_frames] if self.latent_frames else []))
                               .encode())
            with torch.no_grad():
                for name, p in self.mp.model.diffusion_model.named_parameters():
                    h.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
                for k in sorted(self.mp.patches):
                    h.update(f"{k}{len(self.mp.patches[k])}".encode())
                h.update(f"{float(self.cond('a photo')[0][0].float().sum()):.6e}".encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def cond(self, text: str) -> list:
        if text not in self._conds:
            with torch.no_grad():  # constants for training: never part of an autograd graph
                enc = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
            self._conds[text] = [[t.detach(), {k: v.detach() if torch.is_tensor(v) else v for k, v in d.items()}]
                                 for t, d in enc]
        return self._conds[text]

    def batch_cond(self, texts: list[str]) -> list:
        """One conditioning whose batch rows are the given prompts (every per-prompt tensor extra of one
        shape batched too: pooled outputs, token masks, HiDream's Llama layers)."""
        parts = [self.cond(t)[0] for t in texts]
        extra = dict(parts[0][1])
        for key in extra:  # per-prompt tensors (pooled outputs, token masks, HiDream's Llama layers) batched
            vals = [p[1].get(key) for p in parts]
            if all(torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 1 for v in vals) \
                    and len({tuple(v.shape) for v in vals}) == 1:
                extra[key] = torch.cat(vals)
        return [[cat_token_rows([p[0] for p in parts]), extra]]

    def sigma_range(self) -> tuple[float, float]:
        ms = self.mp.get_model_object("model_sampling")
        return float(ms.sigma_min), float(ms.sigma_max)

    def length_groups(self, texts: list[str]) -> list[list[int]]:
        """The prompts' indices grouped by their embeddings' token count: one group for CLIP-chunked or
        padded encoders; several for an encoder whose output length varies with the prompt (Qwen,
        Llama, Gemma-based ones), whose prompts are sampled and denoised group by group, never
        repeated to a common length (their token positions would change)."""
        if self.layout() == 0:
            return [list(range(len(texts)))]
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(texts):
            groups.setdefault(int(self.cond(t)[0][0].shape[1]), []).append(i)
        return list(groups.values())

    def trajectories(self, prompts, seed, steps, cfg, negatives=None):
        """Plain-CFG trajectories of ``prompts``; ``negatives`` (B, T, D), if given, are the
        unconditional branch's text embeddings instead of the empty prompt's (a text HGR's, for
        on-policy teacher states). Prompts of different token counts are sampled group by group with
        their own rows of the same noise."""
        frames = (self.latent_frames,) if self.latent_frames else ()
        lat = torch.zeros(len(prompts), self.latent_channels, *frames, self.height // 8, self.width // 8)
        noise = comfy.sample.prepare_noise(lat, seed)
        ms = self.mp.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, self.scheduler, steps)
        groups = self.length_groups(prompts)
        if negatives is not None and len(groups) > 1:
            raise ValueError("on-policy teacher states need every prompt's embedding at one length; this text "
                             "encoder's vary with the prompt. Train without on-policy rounds.")
        xs: list[list] = [[] for _ in range(steps)]
        x0 = torch.zeros(lat.shape)
        for idx in groups:
            guider = comfy.samplers.CFGGuider(self.mp)
            uncond = self.batch_cond([""] * len(idx))
            if negatives is not None:
                uncond = [[negatives[idx].to(uncond[0][0].dtype), dict(uncond[0][1])]]
            guider.set_conds(self.batch_cond([prompts[i] for i in idx]), uncond)
            guider.set_cfg(cfg)
            last = {}

            def cb(i, x0_, x, total, last=last, idx=idx):
                xs[i].append((idx, x.detach().float().cpu()))
                last["x0"] = x0_.detach().float().cpu()

            with torch.no_grad():
                guider.sample(noise[idx], lat[idx], comfy.samplers.sampler_object(self.sampler), sigmas, callback=cb,
                              disable_pbar=True, seed=seed)
            x0[idx] = last["x0"]
        states = []
        for i, parts in enumerate(xs):
            if not parts:
                continue
            x = torch.zeros(lat.shape)
            for idx, part in parts:
                x[idx] = part
            states.append((x, sigmas[i].expand(len(prompts)).float().cpu()))
        return states, x0

    def denoise(self, x, sigma, prompts):
        mp = self.mp
        comfy.model_management.load_models_gpu([mp])
        device = mp.load_device
        x = x.to(device)
        sigma = sigma.to(device)
        model = mp.model
        mp.pre_run()
        try:
            with torch.no_grad():
                cols = [self.length_groups(col) for col in prompts]
                if all(len(g) == 1 for g in cols):  # one batched call for every column
                    conds = [comfy.samplers.encode_model_conds(model.extra_conds, convert_cond(self.batch_cond(col)),
                                                               x, device, "positive") for col in prompts]
                    out = comfy.samplers.calc_cond_batch(model, conds, x, sigma, mp.model_options)
                else:  # prompts of different token counts: each column group by group
                    out = [self.column_prediction(x, sigma, col) for col in prompts]
        finally:
            mp.cleanup()
        return [o.float().cpu() for o in out]

    def column_prediction(self, x, sigma, texts: list[str]) -> torch.Tensor:
        """``D(x_i, texts[i])`` for every row, ``x`` and ``sigma`` on the model's device: one model call, or
        one per token count (:meth:`length_groups`) with the rows put back in order. Autograd passes
        through it (the safe fine-tune trains through it); the caller loads the model."""
        mp, model, device = self.mp, self.mp.model, self.mp.load_device
        outs, order = [], []
        for idx in self.length_groups(texts):
            cond = comfy.samplers.encode_model_conds(model.extra_conds,
                                                     convert_cond(self.batch_cond([texts[i] for i in idx])),
                                                     x[idx], device, "positive")
            outs.append(comfy.samplers.calc_cond_batch(model, [cond], x[idx], sigma[idx], mp.model_options)[0])
            order += idx
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.tensor(order, device=outs[0].device))]

    # -- the text-embedding HGR's teacher (safecfg.text_train.TextTeacher) -----------------------

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' text embeddings (B, T, D), constants on the CPU; every prompt's must have one
        length (see :meth:`embed_padded` for encoders whose output length varies)."""
        if len(self.length_groups(prompts)) > 1:
            from .hgr_type import model_family

            lengths = sorted({int(self.cond(t)[0][0].shape[1]) for t in prompts})
            raise ValueError(
                f"HGRTrain: the text encoder of this {model_family(self.mp)} model gives these prompts embeddings "
                f"of {len(lengths)} different lengths ({', '.join(map(str, lengths))} tokens); the text HGR's "
                "rewriter and on-policy rounds, and the safe fine-tune driven by a text HGR, need one length for "
                "every prompt, so they are not supported for this encoder yet (the text HGR itself trains on any "
                "lengths). Train without them (rewrite_steps 0), fine-tune with a latent HGR, or use the concept "
                "redirector, which works with any model.")
        return self.batch_cond(prompts)[0][0].float().cpu()

    def embed_padded(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' text embeddings zero-padded to the longest, ``(B, T_max, D)``, and each one's
        token count ``(B,)``: prompts of an encoder whose output length varies (constants, CPU)."""
        rows = [self.cond(t)[0][0][0].float().cpu() for t in prompts]
        lengths = torch.tensor([r.shape[0] for r in rows])
        out = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, :r.shape[0]] = r
        return out, lengths

    def layout(self) -> int:
        """The text HGR's token layout for this model (``nodes.hgr_type.text_layout``)."""
        from .hgr_type import text_layout

        return text_layout(self.mp)

    def empty_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (T, D): an untrained text HGR returns it."""
        return self.cond("")[0][0][0].float().cpu()

    def denoise_embedding(self, x, sigma, context):
        """``D(x, context)`` for text embeddings ``context`` (B, T, D), differentiable in ``context``.
        Extra conditioning (an SDXL pooled output) is the empty prompt's."""
        mp = self.mp
        comfy.model_management.load_models_gpu([mp])
        device = mp.load_device
        x, sigma = x.to(device), sigma.to(device)
        extra = {k: (v.expand(x.shape[0], *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else v)
                 for k, v in self.cond("")[0][1].items()}
        mask = extra.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape[-1] != context.shape[1]:  # one unpadded prompt of this length
            extra["attention_mask"] = torch.ones(x.shape[0], context.shape[1], dtype=mask.dtype)
        cond = [[context.to(device, x.dtype), extra]]
        conds = [comfy.samplers.encode_model_conds(mp.model.extra_conds, convert_cond(cond), x, device, "positive")]
        mp.pre_run()
        try:
            return comfy.samplers.calc_cond_batch(mp.model, conds, x, sigma, mp.model_options)[0].float()
        finally:
            mp.cleanup()


def cat_token_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Text embeddings (1, T_i, D) of prompts of different lengths (a prompt over 77 tokens has
    several CLIP chunks) as one batch: each is repeated along the tokens to the least common multiple
    of the lengths, as ComfyUI batches cross-attention conditionings. Attention over a sequence
    repeated k times equals attention over the sequence, so every row means what it meant alone."""
    lengths = {int(r.shape[1]) for r in rows}
    if len(lengths) == 1:
        return torch.cat(rows)
    total = math.lcm(*lengths)
    return torch.cat([r.repeat(1, total // r.shape[1], 1) for r in rows])


def swap_inference_params(root: torch.nn.Module) -> list:
    """Replace every inference-mode parameter of ``root`` (weights loaded inside ComfyUI's executor)
    by a plain frozen copy, which autograd can differentiate through; returns what to put back:
    ``for module, name, original in swapped: module._parameters[name] = original``."""
    swapped = []
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                swapped.append((module, name, p))
    return swapped
