"""Test session setup: a real ComfyUI runtime (no mocks), tiny seeded models, optional real server.

``devtools.comfy.start()`` runs in ``pytest_configure`` (before collection), so test modules may
import ``comfy``, ``nodes``, ``comfy_extras`` and the pack (``safecfg_pack.*``, its one import
identity) at module level. The repository root is on ``sys.path`` through pytest's ``pythonpath``
setting (pyproject.toml); nothing here edits ``sys.path``.
"""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest

from devtools import comfy as runtime

TinyModels = namedtuple("TinyModels", ["model", "clip", "vae"])


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a real ComfyUI server on loopback")
    # the CPU unless SAFECFG_TEST_GPU=1 (then ComfyUI's automatic device)
    gpu = os.environ.get("SAFECFG_TEST_GPU", "") in ("1", "true", "yes")
    runtime.start(cpu=None if gpu else True, test_nodes=True)
    # Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with another
    # torch process OpenMP spin-waiting made this suite ~4x slower (91 s vs 23 s). 0 = torch default.
    threads = int(os.environ.get("SAFECFG_TEST_THREADS", "1"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def pytest_report_header(config):
    lines = [f"comfyui: {runtime.find_comfy_dir()}"]
    try:
        import comfyui_version

        lines[0] += f" (version {comfyui_version.__version__})"
    except Exception:
        pass
    if runtime.pack_loaded():
        lines.append(f"safecfg pack: loaded, nodes {', '.join(runtime.pack_node_ids())}")
    else:
        first = (runtime.pack_error() or "").strip().splitlines()[-1:] or ["?"]
        lines.append(f"safecfg pack: FAILED TO LOAD ({first[0]})")
    return lines


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return runtime.find_comfy_dir()


@pytest.fixture(scope="session")
def pack():
    """Require this pack's nodes; fails with ComfyUI's load error if the pack did not load."""
    if not runtime.pack_loaded():
        pytest.fail(f"the SafeCFG pack failed to load in ComfyUI:\n{runtime.pack_error()}", pytrace=False)
    return runtime.pack_node_ids()


@pytest.fixture
def sd15() -> TinyModels:
    """(model, clip, vae): tiny seeded SD1.5-family ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE."""
    from devtools.tiny_nodes import models as tiny_models

    return TinyModels(tiny_models.tiny_sd15(0), tiny_models.tiny_sd15_clip(0), tiny_models.tiny_vae(0))


@pytest.fixture
def sdxl() -> TinyModels:
    """(model, clip, vae): tiny seeded SDXL-family ModelPatcher, comfy.sd.CLIP (pooled 1280), VAE."""
    from devtools.tiny_nodes import models as tiny_models

    return TinyModels(tiny_models.tiny_sdxl(0), tiny_models.tiny_sdxl_clip(0), tiny_models.tiny_vae(0))


@pytest.fixture(scope="session")
def run_prompt():
    """``run_prompt(prompt: dict) -> outputs``: execute an API-format graph headless."""
    return runtime.run_prompt


@pytest.fixture(scope="session")
def get_node():
    """``get_node(node_id) -> class`` from nodes.NODE_CLASS_MAPPINGS."""
    return runtime.get_node


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server (main.py on loopback) shared by the session's server tests."""
    from devtools.server import comfy_server as _comfy_server

    with _comfy_server() as srv:
        yield srv
