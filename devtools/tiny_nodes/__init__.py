"""Development-only ComfyUI node pack: ``SafeCFGTestTinyModel`` gives a tiny, seeded, real MODEL/CLIP/VAE.

Loaded by :func:`devtools.comfy.start` (``test_nodes=True``) and by the server fixture
(``devtools/server.py``, linked into ``custom_nodes/`` as ``safecfg_test_tiny_nodes``) so that
API-format graphs with core nodes (CLIPTextEncode, KSampler, SamplerCustomAdvanced, VAEDecode, ...)
run without any downloaded weights. The pack's own entrypoint never imports it; development code
reaches the builders as ``devtools.tiny_nodes.models``.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from . import models


class SafeCFGTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeCFGTestTinyModel",
            display_name="SafeCFG test: tiny model",
            category="_for_testing/safecfg",
            description="Tiny randomly initialised MODEL, CLIP and VAE of a model family (tests only).",
            inputs=[
                io.Combo.Input("family", options=models.tiny_families(), default="sd15"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Vae.Output(display_name="VAE"),
            ],
        )

    @classmethod
    def execute(cls, family, seed) -> io.NodeOutput:
        model, clip, vae = models.tiny_family(family, int(seed))
        return io.NodeOutput(model, clip, vae)


class SafeCFGTestTinyNodes(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SafeCFGTestTinyModel]


async def comfy_entrypoint() -> SafeCFGTestTinyNodes:
    return SafeCFGTestTinyNodes()
