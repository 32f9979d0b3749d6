"""The ``HGR`` wire type: a redirector plus what the sampler needs to drive it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from comfy_api.v0_0_2 import io

from ..safecfg import model_id
from ..safecfg.redirect import Redirector

HGRType = io.Custom("HGR")


#: where each family's diffusion-model config names the width of its text conditioning
_TEXT_WIDTH_KEYS = ("context_dim",          # SD1.x, SD2.x, SDXL
                    "context_in_dim",       # Flux, Chroma
                    "joint_attention_dim",  # Qwen-Image
                    "cap_feat_dim",         # Lumina 2, Z-Image
                    "text_dim")             # Wan


def model_text_width(model_patcher) -> int | None:
    """The width of the text embedding the model reads (its ``c_crossattn``), from its config; None where
    the config does not say."""
    cfg = getattr(getattr(model_patcher.model, "model_config", None), "unet_config", {}) or {}
    for key in _TEXT_WIDTH_KEYS:
        if cfg.get(key) is not None:
            return int(cfg[key])
    emb = cfg.get("context_embedder_config")  # SD3
    if isinstance(emb, dict) and isinstance(emb.get("params"), dict) and emb["params"].get("in_features"):
        return int(emb["params"]["in_features"])
    channels = cfg.get("caption_channels")  # HiDream: [T5, Llama]; c_crossattn is the T5 part
    if isinstance(channels, (list, tuple)) and channels:
        return int(channels[0])
    return None


def text_layout(model_patcher) -> int:
    """The token layout a text HGR for this model uses (``safecfg.text_hgr.TextHGRConfig.layout``): 0,
    CLIP chunks of 77 tokens, for the UNet families whose only text encoders are CLIP (SD1.x, SD2.x,
    SDXL: their config names a ``context_dim``); 1, the whole sequence, for every other family (T5,
    UMT5 and LLM-based encoders, SD3's CLIP + T5 included)."""
    cfg = getattr(getattr(model_patcher.model, "model_config", None), "unet_config", {}) or {}
    return 0 if cfg.get("context_dim") is not None else 1


#: families whose images go through a video VAE (Qwen-Image uses Wan 2.1's): scored as clips of one frame
IMAGES_ON_VIDEO_VAE = ("QwenImage",)

#: ComfyUI model configs that read another config's text encoder, output for output (a variant of the
#: same denoiser family): a text HGR trained for the value applies to the key. Configs not listed are
#: their own text family; Flux 2 (Mistral) and Z-Image (Qwen3), although ComfyUI derives their configs
#: from Flux's and Lumina 2's, are not listed: their encoders differ.
SAME_TEXT_ENCODER = {
    "FluxSchnell": "Flux", "FluxInpaint": "Flux",
    "SD15_instructpix2pix": "SD15",
    "SDXL_instructpix2pix": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "KOALA_700M": "SDXL", "KOALA_1B": "SDXL",
    "ChromaRadiance": "Chroma",
    "WAN21_I2V": "WAN21_T2V", "WAN21_FunControl2V": "WAN21_T2V", "WAN21_Camera": "WAN21_T2V",
    "WAN22_Camera": "WAN21_T2V", "WAN21_Vace": "WAN21_T2V", "WAN22_T2V": "WAN21_T2V",
}


def text_family(family: str) -> str:
    """The text-encoder family of a ComfyUI model config name: the config whose text encoder it reads
    (:data:`SAME_TEXT_ENCODER`), else the name itself. What a text HGR's family must match."""
    return SAME_TEXT_ENCODER.get(family, family)


def model_family(model_patcher) -> str:
    """The model's family as ComfyUI names its config (``SD15``, ``SDXL``, ``Flux``, ``WAN21_T2V``, ...):
    what a text HGR records as the family it was trained for."""
    cfg = getattr(model_patcher.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else ""


@dataclass
class HGRHandle:
    """What travels along an ``HGR`` wire. Nodes never mutate a handle they receive.

    ``concept_conds`` holds one ComfyUI conditioning per harmful concept; the sampler evaluates them
    in the same batched model call as positive/negative. ``latent_format``/``latent_channels`` are
    the model family a learned HGR was trained for (empty for the concept redirector, which works
    with any CFG model).
    """

    redirector: Redirector
    name: str
    latent_format: str = ""
    latent_channels: int | None = None
    concept_conds: list = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    #: a text-embedding HGR (the paper's form): the text embedding's width and the family it was
    #: trained for
    text_width: int | None = None
    text_family: str = ""
    #: the fingerprint of the model a learned HGR was trained for (``safecfg.model_id``), if recorded
    trained_for: dict | None = None

    def concept_rows(self) -> list:
        """The concept conditionings a sampler or the detector evaluates beside cond and uncond: none
        where the concept redirector's latent stage can never act (its text stage alone needs no row)."""
        return self.concept_conds if getattr(self.redirector, "latent_stage", True) else []

    def check_model(self, model_patcher, node: str) -> None:
        """Fail early, naming the node, if this HGR cannot drive ``model_patcher``; warn (log and UI)
        when it was trained for another model of the same family (an error for the bundled toy HGRs)."""
        fp = model_fingerprint(model_patcher) if self.trained_for else None
        other = fp is not None and not model_id.same_model(self.trained_for, fp)
        msg = (f"{node}: HGR '{self.name}' was trained for {model_id.describe(self.trained_for)}, but the model "
               f"connected is {model_id.describe(fp)}.") if other else ""
        if other and self.trained_for.get("toy"):
            raise ValueError(msg + " The bundled toy-world HGRs work only with the toy-world model (SafeCFG "
                                   "Toy-World Model). For your checkpoint, train an HGR with HGRTrain or use "
                                   "HGRConceptRedirector, which needs no training.")
        self._check_family(model_patcher, node)
        if other:
            warn_user(msg + " It may redirect poorly on this model: train one for it with HGRTrain (or use "
                            "HGRConceptRedirector).")

    def _check_family(self, model_patcher, node: str) -> None:
        lf = model_patcher.model.latent_format
        fam, ch = type(lf).__name__, int(getattr(lf, "latent_channels", 4))
        if self.text_width is not None:
            width = model_text_width(model_patcher)
            family = model_family(model_patcher)
            if width is not None and int(width) != self.text_width:
                raise ValueError(f"{node}: text HGR '{self.name}' reads {self.text_width}-wide text embeddings "
                                 f"({self.text_family or 'its family'}) but the model's text conditioning is "
                                 f"{width} wide ({family or fam}). Load an HGR trained for this model family, train "
                                 "one with HGRTrain, or use HGRConceptRedirector, which works with any model.")
            if self.text_family and family and text_family(self.text_family) != text_family(family):
                # the same width is no proof of the same encoder (Flux, SD3 and Wan all read 4096-wide T5s)
                raise ValueError(f"{node}: text HGR '{self.name}' was trained for {self.text_family} text embeddings "
                                 f"but the model connected is {family}. Load an HGR trained for {family}, train one "
                                 "with HGRTrain, or use HGRConceptRedirector, which works with any model.")
            return
        if self.latent_channels is not None and self.latent_channels != ch:
            raise ValueError(f"{node}: HGR '{self.name}' works on {self.latent_channels}-channel latents but the "
                             f"model has {ch}-channel latents ({fam}). Load an HGR trained for this model family, "
                             "train one with HGRTrain, or use HGRConceptRedirector, which works with any model.")
        if self.latent_format and self.latent_format != fam:
            raise ValueError(f"{node}: HGR '{self.name}' was trained for the {self.latent_format} latent family but "
                             f"the model is {fam}. Load an HGR trained for this model family, train one with "
                             "HGRTrain, or use HGRConceptRedirector, which works with any model.")


def handle_for(hgr, name: str) -> HGRHandle:
    """The ``HGR`` wire value for a loaded learned HGR file (latent or text kind)."""
    trained_for = getattr(hgr, "trained_for", None)
    if getattr(hgr, "kind", "") == "text":  # the paper's form: acts on the text embedding
        return HGRHandle(hgr, name=name, categories=hgr.categories, text_width=hgr.config.embed_dim,
                         text_family=hgr.family, trained_for=trained_for)
    return HGRHandle(hgr, name=name, latent_format=hgr.latent_format, latent_channels=hgr.config.latent_channels,
                     categories=hgr.categories, trained_for=trained_for)


def model_fingerprint(model_patcher, name: str = "") -> dict | None:
    """The fingerprint of a ComfyUI model's denoiser (its unpatched weights: a LoRA applied through
    the model patcher does not change it); None when the weights cannot be read (e.g. a quantised
    format another pack provides)."""
    try:
        dm = model_patcher.model.diffusion_model
        named = dict(dm.named_parameters())
        backup = getattr(model_patcher, "backup", None) or {}

        def value_of(k):
            b = backup.get("diffusion_model." + k)
            return b.weight if b is not None else named[k]

        cfg = getattr(model_patcher.model, "model_config", None)
        return model_id.fingerprint(named, value_of=value_of, name=name or (type(cfg).__name__ if cfg else ""))
    except Exception as e:  # never let a fingerprint break sampling
        logging.info("SafeCFG: no model fingerprint (%s: %s)", type(e).__name__, e)
        return None


#: each warning's message -> the prompt it was last shown for (bounded by the distinct messages)
_warned: dict[str, object] = {}


def warn_user(message: str) -> None:
    """A warning in the log and, when a server runs, a toast in the UI (the pack's web extension) for
    the client whose prompt is running; each distinct message once per prompt."""
    logging.warning(message)
    try:
        from server import PromptServer

        srv = getattr(PromptServer, "instance", None)
        if srv is None:
            return
        prompt = getattr(srv, "last_prompt_id", None)
        if message in _warned and _warned[message] == prompt:
            return
        _warned[message] = prompt
        srv.send_sync("safecfg.warning", {"message": message}, getattr(srv, "client_id", None))
    except Exception:  # no server (command line, tests): the log line is the warning
        pass


def state_dir(kind: str, name: str) -> str:
    """Where a training run keeps its cache and resumable state: ComfyUI's user directory, never a
    model folder (ComfyUI scans those, and their contents show up in the loaders' lists)."""
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "safecfg", kind, name)
