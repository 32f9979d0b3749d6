"""The toy-world text-to-image model, built from ComfyUI's own SD1.5-family classes.

A TAESD-architecture VAE (8x8x4 latents for 64x64 images, SD1.5 latent format), a tiny
CLIP-architecture text encoder with the real SD1 tokenizer, and a small SD1.5-family UNet. The
weights live in ``weights/toyworld/*.safetensors`` with their configuration in the metadata; this
module turns them into the MODEL, CLIP and VAE objects every core node accepts.

Imports ComfyUI (call it only inside a ComfyUI process).
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import torch

from .models_io import load_sd, read_meta, save_weights  # noqa: F401  (re-exported)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "toyworld"
FILES = {"unet": "toy_unet.safetensors", "clip": "toy_clip.safetensors", "vae": "toy_vae.safetensors",
         "oracle": "toy_oracle.safetensors"}

CONTEXT_DIM = 128
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM, "use_temporal_resblock": False, "use_temporal_attention": False,
}
CLIP_CONFIG = {"hidden_size": CONTEXT_DIM, "intermediate_size": 4 * CONTEXT_DIM, "num_attention_heads": 4,
               "num_hidden_layers": 2, "projection_dim": CONTEXT_DIM}


def weights_path(kind: str) -> Path:
    return WEIGHTS / FILES[kind]


# ---------------------------------------------------------------------------------------------

def new_unet() -> comfy.model_patcher.ModelPatcher:
    model = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def new_clip() -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32,
                                                       "clip_l_model_config": dict(CLIP_CONFIG)})


def new_vae_module() -> comfy.taesd.taesd.TAESD:
    return comfy.taesd.taesd.TAESD()


def load_unet(path=None) -> comfy.model_patcher.ModelPatcher:
    mp = new_unet()
    sd = load_sd(path or weights_path("unet"))
    missing, unexpected = mp.model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"toy UNet weights do not match the architecture: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    mp.model.eval()
    return mp


def load_clip(path=None) -> comfy.sd.CLIP:
    clip = new_clip()
    sd = load_sd(path or weights_path("clip"))
    missing, unexpected = clip.cond_stage_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "logit_scale" not in k and "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"toy CLIP weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


def load_vae(path=None) -> comfy.sd.VAE:
    sd = load_sd(path or weights_path("vae"))
    return comfy.sd.VAE(sd=sd)


def clip_token_ids(clip: comfy.sd.CLIP, text: str) -> list[int]:
    """The 77 token ids ComfyUI's CLIPTextEncode feeds the encoder for ``text`` (first chunk)."""
    toks = clip.tokenize(text)["l"][0]
    return [t[0] for t in toks]


TOY_MODEL_NAME = "the toy-world UNet (weights/toyworld/toy_unet.safetensors)"


def toy_fingerprint(unet: comfy.model_patcher.ModelPatcher | None = None) -> dict:
    """The toy UNet's fingerprint, marked as the toy model: an HGR trained for it refuses, with an
    error, to drive any other model."""
    from ..nodes.hgr_type import model_fingerprint

    fp = model_fingerprint(unet if unet is not None else load_unet(), name=TOY_MODEL_NAME)
    return dict(fp, toy=True)
