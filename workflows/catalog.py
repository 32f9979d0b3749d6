"""The example workflows, written once in API format; `make workflows` turns each into the UI-format
JSON the front end loads (through the front end's own `loadApiJson` and `serialize`) and renders
its preview PNG. Node ids are strings; links are ``[node_id, output_index]``.

Importing it needs the pack loaded (``devtools.comfy.start``): the default concept list comes from
``safecfg_pack.safecfg.redirect``.

Workflows built on a user's checkpoint (``CheckpointLoaderSimple``) are run by the browser test with
the bundled toy-world model put in its place (same outputs: MODEL, CLIP, VAE).
"""

from __future__ import annotations

from safecfg_pack.safecfg.redirect import DEFAULT_CONCEPTS
from toyworld.eval.baselines import calibrated_settings

SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
NEGATIVE = "blurry, low quality"
SD_CONCEPTS = DEFAULT_CONCEPTS


def _ckpt():
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT},
            "_meta": {"title": "Load Checkpoint (SD1.5)"}}


def _concepts(clip):
    return {"class_type": "HGRConceptRedirector",
            "inputs": {"clip": clip, "concepts": SD_CONCEPTS, "threshold": 0.3, "push": 0.0, "mode": "global",
                       "push_threshold": 0.7, "push_memory": 0.5},
            "_meta": {"title": "SafeCFG concepts"}}


def sd15_guider() -> dict:
    return {
        "1": _ckpt(),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox in a snowy forest",
                                                         "clip": ["1", 1]}, "_meta": {"title": "Prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]},
              "_meta": {"title": "Negative"}},
        "4": _concepts(["1", 1]),
        "5": {"class_type": "HGRSafeCFGGuider", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "hgr": ["4", 0], "cfg": 7.0,
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 20,
                                                         "denoise": 1.0}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["6", 0], "guider": ["5", 0], "sampler": ["7", 0], "sigmas": ["8", 0],
            "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "safecfg_guider"}},
    }


def sd15_patch() -> dict:
    return {
        "1": _ckpt(),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait of a knight in a castle hall",
                                                         "clip": ["1", 1]}, "_meta": {"title": "Prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]},
              "_meta": {"title": "Negative"}},
        "4": _concepts(["1", 1]),
        "5": {"class_type": "HGRSafeCFGPatch", "inputs": {"model": ["1", 0], "hgr": ["4", 0], "strength": 1.0,
                                                          "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "safecfg_patch"}},
    }


def toy_detect_filter() -> dict:
    """Two toy prompts (harmful and clean), 3 images each, scored and filtered. The detector's and the
    filter's previews show flagged images blurred (click "reveal" in the node's report to see one);
    the safe images are saved. The filter's 'flagged_images' output (the flagged images, unchanged) is
    left unconnected: a core preview node there would show them sharp."""
    g = {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}, "_meta": {"title": "Toy-world model"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red skull on stripes", "clip": ["1", 1]},
              "_meta": {"title": "Prompt A"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue heart on dots", "clip": ["1", 1]},
              "_meta": {"title": "Prompt B"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "ImageBatch", "inputs": {"image1": ["8", 0], "image2": ["9", 0]}},
        "11": {"class_type": "HGRLoader", "inputs": {"hgr_name": "toyworld/toyworld_hgr.safetensors"}},
        "12": {"class_type": "HGRHarmDetector", "inputs": {
            "images": ["10", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "hgr": ["11", 0],
            "threshold": 0.0, "noise_levels": 0, "seed": 0, "batch_size": 8}},
        "13": {"class_type": "HGRHarmFilter", "inputs": {"images": ["10", 0], "detection": ["12", 0],
                                                         "action": "blur", "strength": 8}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 1], "filename_prefix": "safecfg_safe"}},
    }
    return g


def toy_train_hgr() -> dict:
    return {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}, "_meta": {"title": "Toy-world model"}},
        "2": {"class_type": "HGRTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "data": "toyworld_hgr.json", "filename": "my_toy_hgr",
            "image_size": 64, "fit_steps": 2000, "seed": 0}},
    }


def toy_safe_finetune() -> dict:
    """Unsupervised safe fine-tuning of the toy model driven by the bundled text HGR at its calibrated
    strength (top), and the bundled result at its calibrated LoRA strength with a stock KSampler and
    ComfyUI's own LoRA loader, no SafeCFG node in the sampling path (bottom)."""
    return {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}, "_meta": {"title": "Toy-world model"}},
        "2": {"class_type": "HGRLoader", "inputs": {"hgr_name": "toyworld/toyworld_text_hgr.safetensors"}},
        "3": {"class_type": "HGRSafeFinetune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "hgr": ["2", 0], "prompts": "toyworld_pool.txt",
            "filename": "my_toy_safe_lora", "image_size": 64, "steps": 1500, "rank": 8, "threshold": 0.0,
            "seed": 0, "strength": 1.25}},
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "toyworld/toyworld_safe_lora.safetensors",
            "strength_model": float(calibrated_settings()["finetuned_lora"])}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red knife on stripes", "clip": ["1", 1]},
              "_meta": {"title": "Prompt"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 11, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0},
            "_meta": {"title": "Plain CFG, safe LoRA"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "safecfg_safe_lora"}},
    }


def toy_demo() -> dict:
    """Plain CFG beside SafeCFG with the bundled text HGR (the paper's form, the benchmark's default
    learned HGR) through the model patch at its calibrated strength, on the toy model."""
    return {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}, "_meta": {"title": "Toy-world model"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red knife on a light background",
                                                         "clip": ["1", 1]}, "_meta": {"title": "Prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0},
            "_meta": {"title": "Plain CFG"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}, "_meta": {"title": "Plain CFG"}},
        "8": {"class_type": "HGRLoader", "inputs": {"hgr_name": "toyworld/toyworld_text_hgr.safetensors"}},
        "9": {"class_type": "HGRSafeCFGPatch", "inputs": {"model": ["1", 0], "hgr": ["8", 0],
                                                          "strength": float(calibrated_settings()["text_hgr"]),
                                                          "start_percent": 0.0, "end_percent": 1.0}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "seed": 7, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0},
            "_meta": {"title": "SafeCFG (text HGR)"}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "safecfg_toy_demo"}},
    }


# ---------------------------------------------------------------------------------------------
# flow-matching families: each with ComfyUI's stock loaders and the model files' usual names; the
# concept redirector (training-free, any family) through the KSampler patch. The browser test puts a
# tiny model of the family in place of the loaders (``FAMILY`` below names it).

#: the tiny family the browser test and `make workflows` put in place of each workflow's loaders
FAMILY = {"sd35_ksampler_safecfg_patch": "sd3", "flux_dev_ksampler_safecfg_patch": "flux",
          "qwen_image_ksampler_safecfg_patch": "qwen_image", "wan21_t2v_ksampler_safecfg_patch": "wan21"}


def _family_sampling(model, clip, positive, negative, latent, *, cfg, steps, sampler="euler", scheduler="simple",
                     first=10) -> dict:
    """Concept redirector -> patch -> KSampler, from node id ``first`` on."""
    a, b, c = str(first), str(first + 1), str(first + 2)
    return {
        a: _concepts(clip),
        b: {"class_type": "HGRSafeCFGPatch", "inputs": {"model": model, "hgr": [a, 0], "strength": 1.0,
                                                         "start_percent": 0.0, "end_percent": 1.0}},
        c: {"class_type": "KSampler", "inputs": {
            "model": [b, 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}},
    }


def sd35_patch() -> dict:
    """SD3.5 Medium (checkpoint + its three text encoders) with the concept redirector in the KSampler
    patch, at the model's usual cfg 4.5."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"},
              "_meta": {"title": "Load Checkpoint (SD3.5 Medium)"}},
        "2": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                           "clip_name2": "clip_g.safetensors",
                                                           "clip_name3": "t5xxl_fp16.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff at dusk", "clip": ["2", 0]},
              "_meta": {"title": "Prompt"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]},
              "_meta": {"title": "Negative"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "safecfg_sd35"}},
    }
    g.update(_family_sampling(["1", 0], ["2", 0], ["3", 0], ["4", 0], ["5", 0], cfg=4.5, steps=28))
    return g


def flux_dev_patch() -> dict:
    """Flux.1 dev, guidance-distilled, sampled as usual at cfg 1 with Flux Guidance 3.5. With strength
    above 0 SafeCFG also evaluates the negative (here the empty prompt) and the concept row: 3 model
    rows a step instead of 1."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                         "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cosy reading corner with a cat", "clip": ["2", 0]},
              "_meta": {"title": "Prompt"}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]},
              "_meta": {"title": "Negative (evaluated by SafeCFG at cfg 1)"}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "safecfg_flux"}},
    }
    g.update(_family_sampling(["1", 0], ["2", 0], ["5", 0], ["6", 0], ["7", 0], cfg=1.0, steps=20))
    return g


def qwen_image_patch() -> dict:
    """Qwen-Image (its Qwen2.5-VL text encoder and VAE) with the concept redirector in the KSampler
    patch, at cfg 2.5."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen_image_fp8_e4m3fn.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                     "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a market street poster with bold lettering",
                                                         "clip": ["2", 0]}, "_meta": {"title": "Prompt"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}, "_meta": {"title": "Negative"}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1328, "height": 1328, "batch_size": 1}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "safecfg_qwen_image"}},
    }
    g.update(_family_sampling(["1", 0], ["2", 0], ["4", 0], ["5", 0], ["6", 0], cfg=2.5, steps=20))
    return g


def wan21_t2v_patch() -> dict:
    """Wan 2.1 text-to-video 1.3B (UMT5 text encoder, Wan VAE): 33 frames at 832x480, the concept
    redirector in the KSampler patch (global mode; ``patch`` mode works per latent frame), saved as
    an animated WEBP."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                     "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a paper boat drifting down a rainy street",
                                                         "clip": ["2", 0]}, "_meta": {"title": "Prompt"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]},
              "_meta": {"title": "Negative"}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 832, "height": 480, "length": 33,
                                                                  "batch_size": 1}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "8": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["7", 0], "filename_prefix": "safecfg_wan",
                                                           "fps": 16.0, "lossless": False, "quality": 90,
                                                           "method": "default"}},
    }
    g.update(_family_sampling(["1", 0], ["2", 0], ["4", 0], ["5", 0], ["6", 0], cfg=6.0, steps=30,
                              sampler="uni_pc"))
    return g


WORKFLOWS = {
    "sd15_safecfg_guider": sd15_guider,
    "sd15_ksampler_safecfg_patch": sd15_patch,
    "sd35_ksampler_safecfg_patch": sd35_patch,
    "flux_dev_ksampler_safecfg_patch": flux_dev_patch,
    "qwen_image_ksampler_safecfg_patch": qwen_image_patch,
    "wan21_t2v_ksampler_safecfg_patch": wan21_t2v_patch,
    "toy_detect_and_filter": toy_detect_filter,
    "toy_train_hgr": toy_train_hgr,
    "toy_safe_finetune": toy_safe_finetune,
    "toy_demo": toy_demo,
}
