"""SafeCFG for ComfyUI: redirects harmful classifier-free guidance inside the sampler.

This module only exposes ComfyUI's V3 entrypoint and the web folder; the nodes are imported when
ComfyUI calls the entrypoint, so importing the package does no work and needs no ComfyUI. On a
ComfyUI without the versioned V3 node API it logs one line naming the version it needs.
"""

import importlib.util
import logging
import sys

WEB_DIRECTORY = "./web"
#: the oldest ComfyUI the pack is tested on (``make test-matrix``); it needs the V3 API ``comfy_api.v0_0_2``
MIN_COMFYUI = "0.3.52"


def _has_v3_api() -> bool:
    try:
        return importlib.util.find_spec("comfy_api.v0_0_2") is not None
    except (ImportError, ValueError):
        return False


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

if "folder_paths" in sys.modules and not _has_v3_api():  # inside a ComfyUI that predates the V3 API
    try:
        from comfyui_version import __version__ as _found
    except ImportError:
        _found = "of unknown version"
    logging.error("SafeCFG for ComfyUI needs ComfyUI %s or newer (its V3 node API, comfy_api.v0_0_2); this ComfyUI "
                  "is %s, so the pack loads no nodes. Update ComfyUI.", MIN_COMFYUI, _found)
    NODE_CLASS_MAPPINGS: dict = {}  # an old ComfyUI reads this; it holds nothing here
