"""The bundled toy-world model as MODEL, CLIP and VAE: the demo's embedded default."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

CATEGORY = "SafeCFG"
_CACHE: dict = {}


class HGRDemoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRDemoModelLoader",
            display_name="SafeCFG Toy-World Model",
            category=CATEGORY,
            description=("The pack's bundled toy-world text-to-image model (64x64 images of coloured shapes, two "
                         "'harmful' classes: knives and skulls). For trying SafeCFG without a checkpoint."),
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip="SD1.5-family UNet; sample 64x64 images (8x8 latents)."),
                     io.Clip.Output(display_name="CLIP", tooltip="Tiny CLIP text encoder (SD1 tokenizer)."),
                     io.Vae.Output(display_name="VAE", tooltip="TAESD-architecture VAE (8x8x4 latents).")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from ..toyworld import models

        try:
            if "bundle" not in _CACHE:
                _CACHE["bundle"] = (models.load_unet(), models.load_clip(), models.load_vae())
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"HGRDemoModelLoader: {e}. Reinstall the pack or run `make toy-train`.") from None
        unet, clip, vae = _CACHE["bundle"]
        return io.NodeOutput(unet.clone(), clip.clone(), vae)
