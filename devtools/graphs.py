"""API-format graphs on the development-only tiny model (``devtools/tiny_nodes``)."""

from __future__ import annotations


def txt2img_prompt(family: str = "sd15", *, seed: int = 0, model_seed: int = 0, steps: int = 2,
                   cfg: float = 5.0, sampler_name: str = "euler", scheduler: str = "normal",
                   positive: str = "a red cat", negative: str = "blurry", width: int = 64,
                   height: int = 64, batch_size: int = 1, output: str = "SaveImage",
                   filename_prefix: str = "safecfg_test") -> dict:
    """API-format txt2img graph on the tiny test model, with fixed node ids:

    "1" SafeCFGTestTinyModel -> "2"/"3" CLIPTextEncode (positive/negative), "4" EmptyLatentImage,
    "5" KSampler, "6" VAEDecode, "7" ``output`` (SaveImage or PreviewImage).
    Tests can splice patch nodes in by rewriting ``prompt["5"]["inputs"]["model"]``.
    """
    out_inputs = {"images": ["6", 0]}
    if output == "SaveImage":
        out_inputs["filename_prefix"] = filename_prefix
    return {
        "1": {"class_type": "SafeCFGTestTinyModel", "inputs": {"family": family, "seed": model_seed}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": output, "inputs": out_inputs},
    }
