"""ComfyUI adapters over the ``safecfg`` core: the pack's nodes and its V3 entrypoint."""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import ComfyExtension, io
from typing_extensions import override

from .demo_nodes import HGRDemoModelLoader
from .detect_nodes import HGRHarmDetector, HGRHarmFilter
from .finetune_nodes import HGRSafeFinetune
from .guidance_nodes import HGRSafeCFGGuider, HGRSafeCFGPatch, HGRTextNegative
from .hgr_nodes import HGRConceptRedirector, HGRLoader, register_folder
from .train_nodes import HGRTrain

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES: list[type[io.ComfyNode]] = [HGRLoader, HGRConceptRedirector, HGRSafeCFGGuider, HGRSafeCFGPatch,
                                   HGRDemoModelLoader, HGRTrain, HGRHarmDetector, HGRHarmFilter,
                                   HGRSafeFinetune, HGRTextNegative]


class SafeCFGExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SafeCFGExtension:
    # ComfyExtension.on_load() is not called by ComfyUI 0.3.75: register model folders here.
    register_folder(os.path.join(PACK_DIR, "weights", "hgr"))
    # the bundled toy-world safe LoRAs, for LoraLoaderModelOnly (never the default folder for new files)
    import folder_paths

    folder_paths.add_model_folder_path("loras", os.path.join(PACK_DIR, "weights", "loras"), is_default=False)
    return SafeCFGExtension()
