"""The methods of the benchmark and how each is sampled: plain CFG, a negative prompt, SLD-style safe
guidance, the concept redirector, the learned HGR and the fine-tuned LoRAs (applied with ComfyUI's own
LoRA loader, sampled with plain CFG). Every tunable method has a calibration grid of the same size
(``GRIDS``); `make calibrate` picks each one's setting and `make eval` runs it (``calibrated_settings``)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONCEPTS = "weapon: knife, dagger, blade\ngore: skull, cranium, deathshead"
#: the same concepts, each replaced by its safe counterpart (the concept node's "a -> b" syntax)
CONCEPTS_REPLACE = "weapon: knife, dagger, blade -> spoon\ngore: skull, cranium, deathshead -> circle"
CALIBRATION = REPO / "results" / "calibration.json"

#: every tunable method's calibration grid: the same budget (4 settings) for each, ours and the baselines
GRIDS = {
    # the negative prompt's weight, ComfyUI's "(text:weight)" syntax
    "negative_prompt": ["1.0", "1.3", "1.6", "2.0"],
    # SLD's four published configurations (Schramowski et al. 2023)
    "sld": ["weak", "medium", "strong", "max"],
    # threshold,push,mode[,start_percent[,push_threshold[,push_memory[,replace|erase[,text_match]]]]]: the
    # setting the earlier calibration chose (global, "harmful -> safe", latent stage only), the same with
    # the text stage, the text stage alone (latent threshold 1.0: it never acts), and the local patch
    # mode with the text stage. (The earlier grid's two erase settings, never chosen, made room.)
    "concept": ["0.3,2.0,global,0,0.65,0.7,replace", "0.3,2.0,global,0,0.65,0.7,replace,0.85",
                "1.0,0,global,0,1.0,0,replace,0.85", "0.3,2.0,patch,0,0.65,0.7,replace,0.85"],
    # the SafeCFG node's strength, the same grid for both learned HGRs (above 1 extrapolates; the
    # earlier calibration of the latent HGR chose the top of 0.55-1.0)
    "hgr": ["1.0", "1.25", "1.5", "2.0"],
    # the paper's form (text-embedding HGR): the same node's strength, scaling Delta(c)
    "text_hgr": ["1.0", "1.25", "1.5", "2.0"],
    # LoRA strength (model)
    "finetuned_lora": ["0.5", "1.0", "1.5", "2.0"],
    "supervised_lora": ["0.5", "1.0", "1.5", "2.0"],
}
#: the uncalibrated settings: each method's own default (the concept redirector's: the setting the
#: earlier calibration chose, which the demo workflow uses)
DEFAULTS = {"negative_prompt": "1.0", "sld": "medium", "concept": "0.3,2.0,global,0,0.8", "hgr": "1.0",
            "text_hgr": "1.0",
            "finetuned_lora": "1.0", "supervised_lora": "1.0"}


def calibrated_settings(path: Path = CALIBRATION) -> dict[str, str]:
    """Each method's setting chosen by `make calibrate` (python -m toyworld.calibrate), else its default."""
    try:
        chosen = json.loads(path.read_text())["chosen"]
        return {m: str(chosen[m]["setting"]) if m in chosen else d for m, d in DEFAULTS.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return dict(DEFAULTS)


def split_methods(text: str) -> list[str]:
    """``"plain,concept[0.3,2.0,global],sld"`` -> ["plain", "concept[0.3,2.0,global]", "sld"]: commas inside
    brackets belong to a setting."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [m.strip() for m in out + [cur] if m.strip()]


def split_method(name: str) -> tuple[str, str | None]:
    """``"sld[strong]"`` -> ("sld", "strong"); ``"plain"`` -> ("plain", None)."""
    if name.endswith("]") and "[" in name:
        base, setting = name[:-1].split("[", 1)
        return base, setting
    return name, None


def parse_concept_setting(setting: str) -> tuple[dict, float]:
    """``threshold,push,mode[,start_percent[,push_threshold[,push_memory[,replace|erase[,text_match]]]]]``
    -> the concept node's inputs (``concepts`` included) and the SafeCFG start percent. Without a push
    threshold the push uses ``threshold``; ``replace`` writes each concept as ``harmful -> safe``
    (CONCEPTS_REPLACE), ``erase`` as given; ``text_match`` turns the text stage on at that match
    (without it the stage is off, 1.0)."""
    tau, push, mode, *extra = setting.split(",")
    if len(extra) > 3 and extra[3] not in ("replace", "erase"):
        raise ValueError(f"concept setting {setting!r}: the 7th field can only be 'replace' or 'erase'")
    inputs = {"threshold": float(tau), "push": float(push), "mode": mode,
              "push_threshold": float(extra[1]) if len(extra) > 1 else float(tau),
              "push_memory": float(extra[2]) if len(extra) > 2 else 0.0,
              "concepts": CONCEPTS_REPLACE if len(extra) > 3 and extra[3] == "replace" else CONCEPTS,
              "text_match": float(extra[4]) if len(extra) > 4 else 1.0}
    return inputs, float(extra[0]) if extra else 0.0


# LoRAs in weights/loras/ (python -m commands.safe_finetune --toy ...): unsupervised (HED-scored) and the
# supervised ESD-style baseline that uses the true labels
LORAS = {"finetuned_lora": "toyworld_safe_lora.safetensors", "supervised_lora": "toyworld_supervised_lora.safetensors"}
# SLD's published configurations (warm-up steps of 50, guidance, threshold, momentum scale, momentum
# beta); the warm-up is kept as the same share of the schedule
SLD = {"weak": (15, 20.0, 0.0, 0.0, 0.0), "medium": (10, 1000.0, 0.01, 0.3, 0.4),
       "strong": (7, 2000.0, 0.025, 0.5, 0.7), "max": (0, 5000.0, 1.0, 0.5, 0.7)}


def sld_params(preset: str) -> dict:
    w, g, t, m, b = SLD[preset]
    return {"warmup_frac": w / 50, "guidance": g, "threshold": t, "momentum_scale": m, "mom_beta": b}


SLD_MEDIUM = sld_params("medium")


def sld_guider_class():
    import comfy.samplers
    import torch

    class SLDGuider(comfy.samplers.CFGGuider):
        """Safe Latent Diffusion's update rule (eps space), evaluated in one batched model call."""

        def set_sld(self, safety, steps: int, p=SLD_MEDIUM):
            self.inner_set_conds({"safety": safety})
            self.p, self.steps, self.step = p, steps, 0
            self.momentum = None
            self.start_step = 0  # the step index of the first call (a one-step evaluation sets it)

        def sample(self, *a, **k):
            self.step, self.momentum = self.start_step, None
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
    """Every method of one run, built once: ``names`` in run order (``"sld"`` at its calibrated setting,
    ``"sld[strong]"`` at a given one), ``guider(name, positive)`` a ComfyUI guider that samples it,
    ``settings[name]`` the setting used, ``hgr`` and ``text_hgr`` the learned HGRs' handles (or None)."""

    def __init__(self, model, clip, *, methods: list[str], hgr_path: Path, steps: int, cfg: float,
                 negative_prompt: str, settings: dict[str, str] | None = None, text_hgr_path: Path | None = None):
        import comfy.samplers

        from safecfg_pack.nodes import hgr_type, sampling
        from safecfg_pack.safecfg.hgr_file import load_hgr

        self.model, self.clip, self.steps, self.cfg = model, clip, steps, cfg
        self.negative_prompt = negative_prompt
        self.defaults = dict(settings or calibrated_settings())
        self._sampling = sampling
        self._comfy_samplers = comfy.samplers
        self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        self._cache: dict = {}
        self.hgr = self.text_hgr = None
        if Path(hgr_path).is_file():
            self.hgr = hgr_type.handle_for(load_hgr(hgr_path), Path(hgr_path).name)
        if text_hgr_path is not None and Path(text_hgr_path).is_file():
            self.text_hgr = hgr_type.handle_for(load_hgr(text_hgr_path), Path(text_hgr_path).name)
        self.sld = sld_guider_class()
        self.names, self.settings = [], {}
        for name in methods:
            base, setting = split_method(name)
            if base in LORAS and not (REPO / "weights" / "loras" / "toyworld" / LORAS[base]).is_file():
                continue
            if (base == "hgr" and self.hgr is None) or (base == "text_hgr" and self.text_hgr is None):
                continue
            if base not in DEFAULTS and base != "plain":
                raise ValueError(f"unknown method {base!r}")
            self.names.append(name)
            self.settings[name] = setting if setting is not None else self.defaults.get(base)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def guider(self, name: str, pos):
        import comfy.sd
        import comfy.utils

        from safecfg_pack.nodes import hgr_nodes

        samplers = self._comfy_samplers
        base, setting = split_method(name)[0], self.settings[name]
        if base in LORAS:
            def make():
                lora_file = REPO / "weights" / "loras" / "toyworld" / LORAS[base]
                sd = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
                return comfy.sd.load_lora_for_models(self.model, None, sd, float(setting), 0.0)[0]
            g = samplers.CFGGuider(self._cached(("lora", base, setting), make))
            g.set_conds(pos, self.empty)
        elif base == "plain":
            g = samplers.CFGGuider(self.model)
            g.set_conds(pos, self.empty)
        elif base == "negative_prompt":
            text = self.negative_prompt if float(setting) == 1.0 else f"({self.negative_prompt}:{setting})"
            neg = self._cached(("neg", text), lambda: self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text)))
            g = samplers.CFGGuider(self.model)
            g.set_conds(pos, neg)
        elif base == "sld":
            neg = self._cached(("neg", self.negative_prompt), lambda: self.clip.encode_from_tokens_scheduled(
                self.clip.tokenize(self.negative_prompt)))
            g = self.sld(self.model)
            g.set_conds(pos, self.empty)
            g.set_sld(neg, self.steps, sld_params(setting))
        elif base == "concept":
            inputs, start = parse_concept_setting(setting)
            handle = self._cached(("concept", setting), lambda: hgr_nodes.HGRConceptRedirector.execute(
                clip=self.clip, **inputs).result[0])
            g = self._sampling.SafeCFGGuider(self.model, handle, 1.0, start, 1.0)
            g.set_conds(pos, self.empty)
        elif base in ("hgr", "text_hgr"):
            g = self._sampling.SafeCFGGuider(self.model, self.hgr if base == "hgr" else self.text_hgr, float(setting),
                                             0.0, 1.0)
            g.set_conds(pos, self.empty)
        else:
            raise ValueError(name)
        g.set_cfg(self.cfg)
        return g
