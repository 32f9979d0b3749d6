"""Tiny, seeded, REAL ComfyUI model objects for tests and benchmarks (no downloads, no mocks).

Every builder returns the same object types a checkpoint loader would:

* ``tiny_sd15(seed)``       -> ``comfy.model_patcher.ModelPatcher`` around ``model_base.BaseModel``
                               (``supported_models.SD15`` config, real ``UNetModel``)
* ``tiny_sd15_clip(seed)``  -> ``comfy.sd.CLIP`` (real ``SD1Tokenizer`` files shipped with ComfyUI,
                               ``SD1ClipModel``/``SDClipModel`` with a 32-wide CLIP text encoder)
* ``tiny_vae(seed)``        -> ``comfy.sd.VAE`` (TAESD architecture)
* ``tiny_sdxl(seed)``       -> ModelPatcher around ``model_base.SDXL`` (``adm_in_channels`` 2816:
                               1280 pooled + 6x256 size embeddings, exactly like SDXL)
* ``tiny_sdxl_clip(seed)``  -> ``comfy.sd.CLIP`` with the real ``SDXLTokenizer``/``SDXLClipModel``
                               (clip_l 16 + clip_g 16 = 32 context dims, 1280-wide pooled output)
* ``sdxl_conditioning(seed, n)`` -> a CONDITIONING list without any text encoder.

ComfyUI creates weights with ``comfy.ops.disable_weight_init`` (uninitialised memory), so every
weight is filled from a ``torch.Generator``: Linear/Conv weights ~ N(0, std=gain/sqrt(fan_in)),
embeddings ~ N(0, 0.02), biases 0, norm weights 1. The tiny UNets then predict eps with std ~0.55
that moves by ~15% between prompts; TAESD decodes to mid-grey images with std ~0.2. Scalars that
ComfyUI initialises itself (``logit_scale``, TAESD ``vae_scale``/``vae_shift``) and buffers (noise
schedules) are left as ComfyUI set them.

Import it after ``devtools.comfy.start(test_nodes=True)`` (it imports ``comfy``), as ``devtools.tiny_nodes.models``.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import torch

CONTEXT_DIM = 32
SDXL_CONTEXT_DIM = 32
SDXL_POOLED_DIM = 1280
SDXL_ADM_CHANNELS = 2816  # 1280 pooled + 6 * 256 size/crop embeddings

# A UNet of the SD1.x family: two levels (32, 64 channels), one res block each, cross-attention
# at both levels and in the middle block (8 heads, SD15's fixed num_heads).
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# SDXL family: label embedding ("sequential", 2816 inputs), linear transformer projections,
# no attention at the first level (as in SDXL), heads of 32 channels.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_ADM_CHANNELS,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT_DIM,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
SDXL_NUM_HEAD_CHANNELS = 32

# Overrides of ComfyUI's CLIP-L / CLIP-bigG text configs (vocabulary and 77 positions unchanged,
# so the real tokenizers work). 3 layers so the "penultimate" (-2) layer options are valid.
TINY_CLIP_L = {"hidden_size": CONTEXT_DIM, "intermediate_size": 4 * CONTEXT_DIM,
               "num_attention_heads": 4, "num_hidden_layers": 3, "projection_dim": CONTEXT_DIM}
TINY_SDXL_CLIP_L = {"hidden_size": 16, "intermediate_size": 64, "num_attention_heads": 2,
                    "num_hidden_layers": 3, "projection_dim": 16}
TINY_SDXL_CLIP_G = {"hidden_size": 16, "intermediate_size": 64, "num_attention_heads": 2,
                    "num_hidden_layers": 3, "projection_dim": SDXL_POOLED_DIM}

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
if hasattr(torch.nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (torch.nn.RMSNorm,)


# --------------------------------------------------------------------------------------------
# seeding


def _fill_(t: torch.Tensor, values: torch.Tensor) -> None:
    t.data.copy_(values.to(device=t.device, dtype=t.dtype))


@torch.no_grad()
def seed_module_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Deterministically (re)initialise every non-scalar parameter of ``module`` in place.

    Order follows ``named_modules()``, so the same architecture + seed gives the same weights on
    every machine. Returns ``module``.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for _, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p is None or p.ndim == 0:
                continue  # scalars ComfyUI initialises itself (logit_scale, vae_scale, ...)
            if isinstance(mod, _NORM_TYPES) or "norm" in type(mod).__name__.lower():
                # gains are "weight" or, in Flux/Chroma/HiDream's RMSNorm, "scale"
                gain_param = pname in ("weight", "scale")
                _fill_(p, torch.ones_like(p, device="cpu") if gain_param else torch.zeros_like(p, device="cpu"))
            elif isinstance(mod, torch.nn.Embedding) or pname.endswith("embedding"):
                _fill_(p, torch.randn(p.shape, generator=gen) * 0.02)
            elif pname == "bias" or p.ndim == 1:
                _fill_(p, torch.zeros(p.shape))
            else:
                fan_in = max(1, math.prod(p.shape[1:]))
                _fill_(p, torch.randn(p.shape, generator=gen) * (gain / math.sqrt(fan_in)))
    return module


@torch.no_grad()
def seed_state_dict_(sd: dict, seed: int, gain: float = 1.0) -> dict:
    """Seed a plain state dict (conv/linear weights fan-in normal, 1-d tensors zero, scalars kept)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for k in sorted(sd):
        t = sd[k]
        if not torch.is_floating_point(t) or t.ndim == 0:
            continue
        if t.ndim == 1:
            sd[k] = torch.zeros_like(t)
        else:
            fan_in = max(1, math.prod(t.shape[1:]))
            sd[k] = (torch.randn(t.shape, generator=gen) * (gain / math.sqrt(fan_in))).to(t.dtype)
    return sd


def param_count(obj) -> int:
    """Number of parameters of a ModelPatcher / CLIP / VAE / nn.Module."""
    if isinstance(obj, comfy.model_patcher.ModelPatcher):
        mod = obj.model
    elif isinstance(obj, comfy.sd.CLIP):
        mod = obj.cond_stage_model
    elif isinstance(obj, comfy.sd.VAE):
        mod = obj.first_stage_model
    else:
        mod = obj
    return sum(p.numel() for p in mod.parameters())


# --------------------------------------------------------------------------------------------
# diffusion models


def _patcher(model) -> comfy.model_patcher.ModelPatcher:
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def tiny_sd15(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD1.5-family eps-prediction UNet (~0.9 M params, context dim 32), fp32."""
    model_config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    model = model_config.get_model({})
    seed_module_(model.diffusion_model, seed)
    model.eval()
    return _patcher(model)


def tiny_sdxl(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SDXL-family eps-prediction UNet (adm 2816 = pooled 1280 + size conds, context 32), fp32."""
    model_config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    # SDXL inherits BASE's num_head_channels=64; 32 gives 2 heads on the 64-channel level.
    model_config.unet_config["num_head_channels"] = SDXL_NUM_HEAD_CHANNELS
    model = model_config.get_model({})
    seed_module_(model.diffusion_model, seed)
    model.eval()
    return _patcher(model)


# --------------------------------------------------------------------------------------------
# text encoders


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """The real SDXL dual encoder with tiny configs.

    ``CLIPTextModel.text_projection`` is square (hidden x hidden) in ComfyUI, so with a 16-wide
    clip_g the pooled output would be 16 wide. SDXL's UNet needs a 1280-wide pooled output, so the
    projection is rebuilt as hidden -> projection_dim (1280), which is what the projection is in the
    real 1280-wide bigG model. Everything else is the stock ComfyUI code path.
    """

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=model_options)
        g = self.clip_g.transformer
        hidden = g.text_projection.in_features
        g.text_projection = self.clip_g.operations.Linear(hidden, SDXL_POOLED_DIM, bias=False,
                                                          dtype=dtype, device=device)


def _clip(target, model_options: dict, seed: int) -> comfy.sd.CLIP:
    opts = {"dtype": torch.float32, **model_options}
    clip = comfy.sd.CLIP(target=target, model_options=opts)
    seed_module_(clip.cond_stage_model, seed)
    return clip


def tiny_sd15_clip(seed: int = 0) -> comfy.sd.CLIP:
    """``comfy.sd.CLIP`` with ``SD1Tokenizer`` and a 3-layer, 32-wide CLIP-L (~1.6 M params,
    almost all in the 49408-token embedding)."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    return _clip(target, {"clip_l_model_config": dict(TINY_CLIP_L)}, seed)


def tiny_sdxl_clip(seed: int = 0) -> comfy.sd.CLIP:
    """``comfy.sd.CLIP`` with ``SDXLTokenizer`` + ``SDXLClipModel`` (clip_l 16 + clip_g 16 wide):
    cond (B, 77, 32) and ``pooled_output`` (B, 1280)."""
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    return _clip(target, {"clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                          "clip_g_model_config": dict(TINY_SDXL_CLIP_G)}, seed)


def sdxl_conditioning(seed: int = 0, n: int = 1, width: int = 64, height: int = 64) -> list:
    """A SDXL CONDITIONING without a text encoder: ``[[cond (n,77,32), {"pooled_output": (n,1280),
    width/height/target sizes}]]``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    cond = torch.randn((n, 77, SDXL_CONTEXT_DIM), generator=gen)
    pooled = torch.randn((n, SDXL_POOLED_DIM), generator=gen)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                    "target_width": width, "target_height": height}]]


# --------------------------------------------------------------------------------------------
# VAE


def tiny_vae(seed: int = 0, latent_channels: int = 4) -> comfy.sd.VAE:
    """``comfy.sd.VAE`` with the TAESD architecture (8x up/down), seeded: 4 latent channels (SD1.5,
    SDXL), or 16 (TAEF1/TAESD3's layout, the flow-matching image families' latent)."""
    sd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict()
    seed_state_dict_(sd, seed)
    # The decoder's last conv emits pixels in [0, 1] (ComfyUI clamps). Centre it on mid-grey with a
    # moderate spread so decoded images are neither saturated nor flat (mean ~0.5, std ~0.2).
    last = max((k for k in sd if k.startswith("taesd_decoder.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    sd[last] = sd[last] * 0.5
    bias = last[: -len("weight")] + "bias"
    sd[bias] = torch.full_like(sd[bias], 0.5)
    return comfy.sd.VAE(sd=sd)


def tiny_video_vae(seed: int = 0) -> comfy.sd.VAE:
    """``comfy.sd.VAE`` with the TAEHV architecture (``taew2_1``'s layout: 16 latent channels, a causal
    clip of 4k + 1 frames to k + 1 latent frames), seeded: Wan 2.1's latent."""
    import comfy.taesd.taehv

    sd = comfy.taesd.taehv.TAEHV(latent_channels=16, show_progress_bar=False).state_dict()
    seed_state_dict_(sd, seed)
    return comfy.sd.VAE(sd=sd)


# --------------------------------------------------------------------------------------------
# flow-matching transformer families (ComfyUI's own classes, tiny configs)
#
# Each entry: the ``supported_models`` class, a tiny ``unet_config``, the text embedding width (the
# real model's in brackets), whether the family has a pooled vector input (and its width), and the
# latent shape per image. Constraints the configs meet: Flux/Chroma ``sum(axes_dim) == hidden /
# heads``; Chroma's in/out channels are the patched ones (16 * 2 * 2) and its approximator's
# ``in_dim`` is 64; Qwen-Image and Wan sample 5-D latents (B, 16, T, H, W; Qwen-Image with T = 1);
# Z-Image's modulation needs ``dim`` >= 256.

DIT_FAMILIES = {
    "sd3": dict(cls="SD3", text_dim=64, pooled=32, frames=None, unet={  # real: T5 4096, pooled 2048
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": 32, "pos_embed_scaling_factor": None, "pos_embed_max_size": None,
        "num_patches": None, "qk_norm": None, "x_block_self_attn_layers": [],
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}}}),
    "flux": dict(cls="Flux", text_dim=64, pooled=32, frames=None, guidance=3.5, unet={  # real: 4096, pooled 768
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2, "qkv_bias": True}),
    "chroma": dict(cls="Chroma", text_dim=64, pooled=None, frames=None, unet={  # real: T5 4096
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 14, 14],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32,
        "n_layers": 1}),
    "qwen_image": dict(cls="QwenImage", text_dim=64, pooled=None, frames=1, unet={  # real: Qwen2.5-VL 3584
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
        "axes_dims_rope": [8, 12, 12]}),
    "lumina2": dict(cls="Lumina2", text_dim=32, pooled=None, frames=None, unet={  # real: Gemma2 2304
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 1,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
        "qk_norm": True, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}),  # rope theta: the default
    "z_image": dict(cls="ZImage", text_dim=32, pooled=None, frames=None, unet={  # real: Qwen3-4B 2560
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32, "n_layers": 1,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "multiple_of": 32, "ffn_dim_multiplier": 8.0 / 3.0,
        "qk_norm": True, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}),
    "hidream": dict(cls="HiDream", text_dim=48, pooled=32, frames=None, llama=(2, 40), unet={  # real: 4096s
        "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
        "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [48, 40],
        "text_emb_dim": 32, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [8, 12, 12],
        "max_resolution": [32, 32], "llama_layers": [0, 1]}),
    "wan21": dict(cls="WAN21_T2V", text_dim=32, pooled=None, frames=3, unet={  # real: umt5-xxl 4096
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
        "dim": 64, "ffn_dim": 128, "freq_dim": 256, "text_dim": 32, "num_heads": 2, "num_layers": 1,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}),
}


def dit_families() -> list[str]:
    """The ``DIT_FAMILIES`` the running ComfyUI has (Z-Image, for one, came after 0.3.52)."""
    return sorted(f for f, spec in DIT_FAMILIES.items() if hasattr(comfy.supported_models, spec["cls"]))


def tiny_dit(family: str, seed: int = 0, gain: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """A tiny, seeded model of a flow-matching transformer family (``DIT_FAMILIES``), built as ComfyUI's
    diffusion-model loader builds it (its ``supported_models`` config, ``get_model``, a ModelPatcher),
    fp32, without weights: every parameter is seeded (:func:`seed_module_`)."""
    if family not in DIT_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; one of {sorted(DIT_FAMILIES)}")
    spec = DIT_FAMILIES[family]
    model_config = getattr(comfy.supported_models, spec["cls"])(dict(spec["unet"]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    seed_module_(model.diffusion_model, seed, gain)
    model.eval()
    return _patcher(model)


def dit_conditioning(family: str, seed: int = 0, n: int = 1, tokens: int = 8) -> list:
    """A CONDITIONING for a ``tiny_dit`` family made from seeded tensors (no text encoder), with the
    family's extras: ``pooled_output`` (None where the family has none), Flux's ``guidance``,
    HiDream's ``conditioning_llama3``, Lumina 2's and Z-Image's ``attention_mask``."""
    spec = DIT_FAMILIES[family]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    cond = torch.randn((n, tokens, spec["text_dim"]), generator=gen)
    extra: dict = {"pooled_output": torch.randn((n, spec["pooled"]), generator=gen) if spec["pooled"] else None}
    if "guidance" in spec:
        extra["guidance"] = spec["guidance"]
    if spec["cls"] in ("Lumina2", "ZImage"):  # their encoders (Gemma, Qwen3) give the token mask too
        extra["attention_mask"] = torch.ones((n, tokens), dtype=torch.long)
    if "llama" in spec:
        layers, width = spec["llama"]
        extra["conditioning_llama3"] = torch.randn((n, layers, tokens, width), generator=gen)
    return [[cond, extra]]


def dit_latent_shape(family: str, batch: int = 1, size: int = 16) -> tuple:
    """The latent a ``tiny_dit`` family samples: (B, 16, H, W), or (B, 16, T, H, W) for 5-D families."""
    frames = DIT_FAMILIES[family]["frames"]
    return (batch, 16, size, size) if frames is None else (batch, 16, frames, size, size)


# Flux's text encoders (CLIP-L for the pooled vector, T5-XXL for the sequence) with their real
# tokenizers, shipped with ComfyUI, and tiny configs whose widths match DIT_FAMILIES["flux"]
TINY_FLUX_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2}
TINY_FLUX_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": 32}


def tiny_flux_clip(seed: int = 0) -> comfy.sd.CLIP:
    """``comfy.sd.CLIP`` with ComfyUI's ``FluxTokenizer`` and ``flux_clip()`` model (T5 64 wide, 2 layers;
    CLIP-L 32 wide): cond ``(B, 256, 64)`` and ``pooled_output`` ``(B, 32)``, as ``tiny_dit("flux")`` reads."""
    import comfy.text_encoders.flux as flux_te

    target = comfy.supported_models_base.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip())
    return _clip(target, {"t5xxl_model_config": dict(TINY_FLUX_T5), "clip_l_model_config": dict(TINY_FLUX_CLIP_L)},
                 seed)


# Z-Image's text encoder (Qwen3-4B's architecture, ComfyUI's Qwen tokenizer files) with a tiny config:
# 32 wide (DIT_FAMILIES["z_image"]'s cap_feat_dim), 3 layers (Z-Image reads the penultimate one)
TINY_QWEN3 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 1}


def tiny_z_image_clip(seed: int = 0) -> comfy.sd.CLIP:
    """``comfy.sd.CLIP`` with ComfyUI's ``ZImageTokenizer`` and ``z_image.te()`` (Qwen3, 32 wide): cond
    ``(B, L, 32)`` with an ``attention_mask``, as ``tiny_dit("z_image")`` reads."""
    import comfy.text_encoders.z_image as z_te

    target = comfy.supported_models_base.ClipTarget(z_te.ZImageTokenizer, z_te.te())
    return _clip(target, {"qwen3_4b_model_config": dict(TINY_QWEN3)}, seed)


# HiDream's four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama 3.1; ComfyUI's tokenizers) with tiny configs:
# pooled 16 + 16 = 32 (DIT_FAMILIES["hidream"]'s text_emb_dim), T5 48 wide and Llama 40 wide with 2 layers
# (its caption_channels and llama_layers)
TINY_HIDREAM = {"clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                "clip_g_model_config": dict(TINY_SDXL_CLIP_G, projection_dim=16),
                "t5xxl_model_config": dict(TINY_FLUX_T5, d_model=48, d_kv=12),
                "llama_model_config": {"hidden_size": 40, "intermediate_size": 80, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128320}}


def tiny_hidream_clip(seed: int = 0) -> comfy.sd.CLIP:
    """``comfy.sd.CLIP`` with ComfyUI's ``HiDreamTokenizer`` and ``hidream_clip()`` (tiny): cond
    ``(B, 128, 48)`` (T5), ``pooled_output`` ``(B, 32)`` and ``conditioning_llama3`` ``(B, 2, 128, 40)``,
    as ``tiny_dit("hidream")`` reads."""
    import comfy.text_encoders.hidream as hidream_te

    target = comfy.supported_models_base.ClipTarget(hidream_te.HiDreamTokenizer, hidream_te.hidream_clip())
    return _clip(target, {k: dict(v) for k, v in TINY_HIDREAM.items()}, seed)


#: the text encoder each flow-matching family's tiny stand-in uses: its own where a tiny one is built
#: (Flux: T5 + CLIP-L; Z-Image: Qwen3; HiDream: CLIP-L/G, T5, Llama), else one of the same width and
#: pooled size (SD3: Flux's T5 + CLIP-L for its T5 + CLIP-L/G; Chroma: Flux's T5; Qwen-Image: Flux's
#: T5 for Qwen2.5-VL; Lumina 2: Z-Image's Qwen3 for Gemma 2; Wan: Z-Image's Qwen3 for UMT5)
FAMILY_TEXT = {"flux": "flux", "sd3": "flux", "chroma": "flux", "qwen_image": "flux", "z_image": "z_image",
               "lumina2": "z_image", "hidream": "hidream", "wan21": "z_image"}
#: the families whose VAE is a video VAE (Wan's; Qwen-Image samples images with it)
VIDEO_VAE_FAMILIES = ("qwen_image", "wan21")


#: what each stand-in needs from ComfyUI beyond the family's model class (0.3.52 has neither TAEHV nor the
#: Qwen3 encoder of Z-Image)
_NEEDS = {"z_image": "comfy.text_encoders.z_image", "video_vae": "comfy.taesd.taehv"}


def tiny_families() -> list[str]:
    """Every family :func:`tiny_family` builds on the running ComfyUI: its model class, its text
    encoder's and its VAE's modules all there."""
    import importlib.util

    def has(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    out = ["sd15", "sdxl"]
    for f in FAMILY_TEXT:
        needs = [_NEEDS.get(FAMILY_TEXT[f])] + ([_NEEDS["video_vae"]] if f in VIDEO_VAE_FAMILIES else [])
        if f in dit_families() and all(has(m) for m in needs if m):
            out.append(f)
    return out


def tiny_family(family: str, seed: int = 0):
    """(MODEL, CLIP, VAE) for ``family``: "sd15", "sdxl", or a flow-matching family of
    :data:`FAMILY_TEXT` (its tiny model, text encoder, and a 16-channel VAE: TAESD's layout, or TAEHV's
    for the video-VAE families)."""
    if family == "sd15":
        return tiny_sd15(seed), tiny_sd15_clip(seed), tiny_vae(seed)
    if family == "sdxl":
        return tiny_sdxl(seed), tiny_sdxl_clip(seed), tiny_vae(seed)
    if family in FAMILY_TEXT:
        clip = {"flux": tiny_flux_clip, "z_image": tiny_z_image_clip, "hidream": tiny_hidream_clip}[
            FAMILY_TEXT[family]](seed)
        vae = tiny_video_vae(seed) if family in VIDEO_VAE_FAMILIES else tiny_vae(seed, latent_channels=16)
        return tiny_dit(family, seed), clip, vae
    raise ValueError(f"unknown tiny model family {family!r} (one of {', '.join(tiny_families())})")
