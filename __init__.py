"""SafeCFG for ComfyUI: redirects harmful classifier-free guidance inside the sampler.

This module only exposes ComfyUI's V3 entrypoint and the web folder; the nodes are imported when
ComfyUI calls the entrypoint, so importing the package does no work and needs no ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
