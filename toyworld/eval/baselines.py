"""The methods of the benchmark and how each is sampled: plain CFG, a negative prompt, SLD-style safe
guidance, the concept redirector (its calibrated setting), the learned HGR and the fine-tuned LoRAs
(applied with ComfyUI's own LoRA loader, sampled with plain CFG)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONCEPTS = "weapon: knife, dagger, blade\ngore: skull, cranium, deathshead"


def calibrated_concept_setting(path: Path = REPO / "results" / "calibration.json") -> str:
    """The concept redirector setting chosen by `make calibrate` (python -m toyworld.calibrate)."""
    try:
        return str(json.loads(path.read_text())["concept_setting"])
    except (OSError, ValueError, KeyError):
        return "0.3,0.0,global"


CONCEPT_DEFAULT = calibrated_concept_setting()


def parse_concept_setting(setting: str) -> tuple[dict, float]:
    """``threshold,push,mode[,start_percent[,push_threshold[,push_memory]]]`` -> the concept node's
    inputs and the SafeCFG start percent. Without a push threshold the push uses ``threshold``."""
    tau, push, mode, *extra = setting.split(",")
    inputs = {"threshold": float(tau), "push": float(push), "mode": mode,
              "push_threshold": float(extra[1]) if len(extra) > 1 else float(tau),
              "push_memory": float(extra[2]) if len(extra) > 2 else 0.0}
    return inputs, float(extra[0]) if extra else 0.0


# LoRAs in weights/loras/ (python -m commands.safe_finetune --toy ...): unsupervised (HED-scored) and the
# supervised ESD-style baseline that uses the true labels
LORAS = {"finetuned_lora": "toyworld_safe_lora.safetensors", "supervised_lora": "toyworld_supervised_lora.safetensors"}
# SLD "medium" (Schramowski et al. 2023): warm-up 10 of 50 steps, guidance 1000, threshold 0.01,
# momentum scale 0.3, momentum beta 0.4. The warm-up is kept as the same share of the schedule (20%).
SLD_MEDIUM = {"warmup_frac": 10 / 50, "guidance": 1000.0, "threshold": 0.01, "momentum_scale": 0.3,
              "mom_beta": 0.4}


def sld_guider_class():
    import comfy.samplers
    import torch

    class SLDGuider(comfy.samplers.CFGGuider):
        """Safe Latent Diffusion's update rule (eps space), evaluated in one batched model call."""

        def set_sld(self, safety, steps: int, p=SLD_MEDIUM):
            self.inner_set_conds({"safety": safety})
            self.p, self.steps, self.step = p, steps, 0
            self.momentum = None

        def sample(self, *a, **k):
            self.step, self.momentum = 0, None
            return super().sample(*a, **k)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            p = self.p
            pos, neg, saf = self.conds["positive"], self.conds["negative"], self.conds["safety"]
            d_c, d_u, d_s = comfy.samplers.calc_cond_batch(self.inner_model, [pos, neg, saf], x, timestep,
                                                           model_options)
            s = timestep.view(-1, 1, 1, 1)
            e_c, e_u, e_s = (x - d_c) / s, (x - d_u) / s, (x - d_s) / s
            guide = e_c - e_u
            scale = torch.clamp((e_c - e_s).abs() * p["guidance"], max=1.0)
            safety_scale = torch.where((e_c - e_s) >= p["threshold"], torch.zeros_like(scale), scale)
            g_safe = (e_s - e_u) * safety_scale
            if self.momentum is None:
                self.momentum = torch.zeros_like(guide)
            g_safe = g_safe + p["momentum_scale"] * self.momentum
            self.momentum = p["mom_beta"] * self.momentum + (1 - p["mom_beta"]) * g_safe
            if self.step >= round(p["warmup_frac"] * self.steps):
                guide = guide - g_safe
            self.step += 1
            eps = e_u + self.cfg * guide
            return x - eps * s

    return SLDGuider


class Methods:
    """Every method of one benchmark run, built once: ``names`` in run order, ``guider(name, positive)``
    a ComfyUI guider that samples it, ``hgr`` the learned HGR's handle (or None)."""

    def __init__(self, model, clip, *, methods: str, concept: str, hgr_path: Path, steps: int, cfg: float,
                 negative_prompt: str):
        import comfy.samplers
        import comfy.sd
        import comfy.utils

        from safecfg_pack.nodes import hgr_nodes, hgr_type, sampling
        from safecfg_pack.safecfg.hgr_file import load_hgr

        self.model, self.steps, self.cfg = model, steps, cfg
        self._sampling = sampling
        self._comfy_samplers = comfy.samplers
        self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        self.negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))
        self.concepts, self.concept_start = {}, {}
        settings = [c.strip() for c in concept.split(";") if c.strip()]
        for setting in settings:
            inputs, start = parse_concept_setting(setting)
            name = "concept" if len(settings) == 1 else f"concept[{setting}]"
            self.concepts[name] = hgr_nodes.HGRConceptRedirector.execute(clip=clip, concepts=CONCEPTS,
                                                                         **inputs).result[0]
            self.concept_start[name] = start
        self.hgr = None
        if Path(hgr_path).is_file():
            h = load_hgr(hgr_path)
            self.hgr = hgr_type.HGRHandle(h, name=Path(hgr_path).name, latent_format=h.latent_format,
                                          latent_channels=h.config.latent_channels)
        self.sld = sld_guider_class()
        self.loras = {}
        for method, fname in LORAS.items():
            path = REPO / "weights" / "loras" / fname
            if path.is_file():
                self.loras[method], _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(
                    str(path), safe_load=True), 1.0, 0.0)
        self.names = []
        for m in methods.split(","):
            if m == "concept":
                self.names += list(self.concepts)
            elif m in LORAS:
                if m in self.loras:
                    self.names.append(m)
            elif m and (m != "hgr" or self.hgr is not None):
                self.names.append(m)

    def guider(self, method: str, pos):
        samplers = self._comfy_samplers
        if method in self.loras:
            g = samplers.CFGGuider(self.loras[method])
            g.set_conds(pos, self.empty)
        elif method in ("plain", "negative_prompt"):
            g = samplers.CFGGuider(self.model)
            g.set_conds(pos, self.negative if method == "negative_prompt" else self.empty)
        elif method == "sld":
            g = self.sld(self.model)
            g.set_conds(pos, self.empty)
            g.set_sld(self.negative, self.steps)
        elif method in self.concepts or method == "hgr":
            handle = self.concepts[method] if method != "hgr" else self.hgr
            g = self._sampling.SafeCFGGuider(self.model, handle, 1.0, self.concept_start.get(method, 0.0), 1.0)
            g.set_conds(pos, self.empty)
        else:
            raise ValueError(method)
        g.set_cfg(self.cfg)
        return g
