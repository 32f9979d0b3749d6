"""ComfyUI for the toy world's commands (demo, benchmark, calibration), through ``devtools.comfy.start``."""

from __future__ import annotations


def start(cpu: bool = False) -> None:
    """ComfyUI with its nodes and this pack (``safecfg_pack``): the automatic device unless ``cpu``,
    and PyTorch's attention (``--use-pytorch-cross-attention``), as the toy world's training uses: on a
    CPU it samples the benchmark about a fifth faster than ComfyUI's default sub-quadratic attention,
    which gives the same images up to rounding. The benchmark's figures were measured with it."""
    from devtools import comfy

    try:
        comfy.start(cpu=True if cpu else None, pytorch_attention=True)
    except comfy.ComfyRuntimeError as e:
        raise SystemExit(str(e)) from None
    if not comfy.pack_loaded():
        raise SystemExit(f"the SafeCFG pack failed to load in ComfyUI:\n{comfy.pack_error()}")
