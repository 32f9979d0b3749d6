"""Test-only ComfyUI node pack: ``SafeCFGTestTinyModel`` gives a tiny, seeded, real MODEL/CLIP/VAE.

Loaded by the test harness (``tests/support/runtime.py``) and by the server fixture
(``tests/support/server.py``, linked into ``custom_nodes/`` as ``safecfg_test_tiny_nodes``) so that
API-format graphs with core nodes (CLIPTextEncode, KSampler, SamplerCustomAdvanced, VAEDecode, ...)
run without any downloaded weights. Never shipped to users: it lives under tests/.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from comfy_api.latest import ComfyExtension, io

_MODULE_NAME = "_safecfg_test_support_tiny_models"
_TINY_MODELS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                                 "support", "tiny_models.py")


def _tiny_models():
    """tests/support/tiny_models.py, loaded by file path under a private module name (the pack is
    imported by ComfyUI from a file path, so neither ``tests`` nor ``support`` is importable here)."""
    mod = sys.modules.get(_MODULE_NAME)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, _TINY_MODELS_PATH)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load tiny model builders from {_TINY_MODELS_PATH}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(_MODULE_NAME, None)
            raise
    return mod


class SafeCFGTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeCFGTestTinyModel",
            display_name="SafeCFG test: tiny model",
            category="_for_testing/safecfg",
            description="Tiny randomly initialised SD1.5/SDXL-family MODEL, CLIP and VAE (tests only).",
            inputs=[
                io.Combo.Input("family", options=["sd15", "sdxl"], default="sd15"),
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
        model, clip, vae = _tiny_models().tiny_family(family, int(seed))
        return io.NodeOutput(model, clip, vae)


class SafeCFGTestTinyNodes(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SafeCFGTestTinyModel]


async def comfy_entrypoint() -> SafeCFGTestTinyNodes:
    return SafeCFGTestTinyNodes()
