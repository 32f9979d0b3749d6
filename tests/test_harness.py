"""Smoke tests of the test harness itself: real ComfyUI, tiny seeded models, headless executor,
real server. They must pass whether or not the SafeCFG pack's own nodes load."""

from __future__ import annotations

import math

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import nodes
import numpy as np
import pytest
import torch
from PIL import Image

from devtools import comfy as runtime
from devtools import pack
from devtools.graphs import txt2img_prompt
from devtools.tiny_nodes import models as tiny_models

PARAM_LIMIT = 2_000_000


def _encode(clip, text):
    return runtime.get_node("CLIPTextEncode")().encode(clip, text)[0]


def _ksample(model, positive, negative, seed=0, steps=2, cfg=5.0, size=64):
    latent = runtime.get_node("EmptyLatentImage")().generate(size, size, 1)[0]
    return runtime.get_node("KSampler")().sample(model, seed, steps, cfg, "euler", "normal", positive, negative,
                                                  latent, denoise=1.0)[0]


def _eps(model: comfy.model_patcher.ModelPatcher, cond: list, sigma=3.0, seed=1):
    """eps prediction of the bare model for one CONDITIONING entry (no sampler)."""
    bm = model.model
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * math.sqrt(1 + sigma**2)
    extra = {}
    if bm.adm_channels:
        extra["y"] = bm.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=64, height=64)
    with torch.no_grad():
        denoised = bm.apply_model(x, torch.tensor([sigma]), c_crossattn=cond[0][0], **extra)
    return (x - denoised) / sigma


def _saved_image(outputs: dict, node_id: str, out_dir) -> np.ndarray:
    images = outputs[node_id]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = out_dir / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file(), path
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------------
# runtime


def test_runtime_is_real_comfyui_on_cpu(comfy_dir):
    import comfy.model_management as mm
    import comfyui_version

    assert (comfy_dir / "nodes.py").is_file()
    assert comfyui_version.__version__
    assert mm.get_torch_device().type == "cpu"
    for node_id in ("KSampler", "SamplerCustomAdvanced", "RescaleCFG", "CFGGuider", "SafeCFGTestTinyModel"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
    # ComfyUI writes into a per-session temp dir, never into the ComfyUI tree
    import folder_paths

    assert folder_paths.get_output_directory() == str(runtime.work_dir() / "output")
    assert runtime.start(cpu=True, test_nodes=True) == comfy_dir  # idempotent
    import server

    assert server.PromptServer.instance is not None  # headless stand-in: routes, send_sync


def test_pack_load_status_is_consistent():
    assert isinstance(runtime.pack_loaded(), bool)
    if runtime.pack_loaded():
        assert runtime.pack_error() is None and runtime.pack_node_ids()
        for node_id in runtime.pack_node_ids():
            assert runtime.get_node(node_id) is nodes.NODE_CLASS_MAPPINGS[node_id]
        assert callable(pack.module().comfy_entrypoint)
    else:
        assert runtime.pack_error() and runtime.pack_node_ids() == []
        with pytest.raises(RuntimeError):
            pack.module()


def test_loader_reports_a_broken_pack(tmp_path):
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('deliberately broken test pack')\n")
    ok, ids, err, _ = runtime._load_node_dir(nodes, broken)
    assert not ok and ids == [] and "deliberately broken test pack" in err

    v3 = tmp_path / "v3_pack"
    v3.mkdir()
    (v3 / "__init__.py").write_text(
        "from comfy_api.latest import ComfyExtension, io\n"
        "class HarnessProbeNode(io.ComfyNode):\n"
        "    @classmethod\n"
        "    def define_schema(cls):\n"
        "        return io.Schema(node_id='SafeCFGHarnessProbe', inputs=[io.Int.Input('x')],\n"
        "                         outputs=[io.Int.Output()])\n"
        "    @classmethod\n"
        "    def execute(cls, x):\n"
        "        return io.NodeOutput(x + 1)\n"
        "class Ext(ComfyExtension):\n"
        "    async def get_node_list(self):\n"
        "        return [HarnessProbeNode]\n"
        "async def comfy_entrypoint():\n"
        "    return Ext()\n")
    try:
        ok, ids, err, _ = runtime._load_node_dir(nodes, v3)
        assert ok and ids == ["SafeCFGHarnessProbe"] and err is None
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop("SafeCFGHarnessProbe", None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop("SafeCFGHarnessProbe", None)


def test_get_node_unknown_id_says_so():
    with pytest.raises(KeyError, match="NoSuchNodeXYZ"):
        runtime.get_node("NoSuchNodeXYZ")


# ------------------------------------------------------------------------------------------------
# tiny models


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_models_are_real_small_seeded_and_conditioned(family):
    model, clip, vae = tiny_models.tiny_family(family, 0)
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert tiny_models.param_count(model) < PARAM_LIMIT
    assert tiny_models.param_count(clip) < PARAM_LIMIT
    assert tiny_models.param_count(vae) < 2_500_000  # TAESD itself is ~2.45 M
    for mod in (model.model, clip.cond_stage_model, vae.first_stage_model):
        assert all(torch.isfinite(p).all() for p in mod.parameters())

    a, b = _encode(clip, "a red cat"), _encode(clip, "a blue dog")
    assert a[0][0].shape == (1, 77, 32)
    assert not torch.allclose(a[0][0], b[0][0])
    if family == "sdxl":
        assert a[0][1]["pooled_output"].shape == (1, 1280)
        assert not torch.allclose(a[0][1]["pooled_output"], b[0][1]["pooled_output"])

    ea, eb = _eps(model, a), _eps(model, b)
    assert torch.isfinite(ea).all() and 0.1 < ea.std().item() < 5.0
    assert (ea - eb).abs().mean().item() > 0.01 * ea.abs().mean().item()  # depends on the prompt

    # same seed -> same weights; other seed -> other weights
    build = tiny_models.tiny_sdxl if family == "sdxl" else tiny_models.tiny_sd15
    again, other = build(0), build(1)
    torch.testing.assert_close(_eps(again, a), ea)
    assert not torch.allclose(_eps(other, a), ea)

    img = vae.decode(torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()
    assert 0.05 < img.std().item() < 0.45 and 0.2 < img.mean().item() < 0.8


# ------------------------------------------------------------------------------------------------
# sampling through the core nodes' functions


def test_ksampler_node_samples_tiny_sd15(sd15):
    pos, neg = _encode(sd15.clip, "a red cat"), _encode(sd15.clip, "blurry")
    out = _ksample(sd15.model, pos, neg)
    assert out["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(out["samples"]).all() and out["samples"].std() > 0
    again = _ksample(sd15.model, pos, neg)
    torch.testing.assert_close(again["samples"], out["samples"])  # deterministic per seed
    other = _ksample(sd15.model, _encode(sd15.clip, "a green house"), neg)
    assert not torch.allclose(other["samples"], out["samples"])  # the prompt matters


def test_ksampler_node_samples_tiny_sdxl(sdxl):
    pos, neg = _encode(sdxl.clip, "a red cat"), _encode(sdxl.clip, "blurry")
    out = _ksample(sdxl.model, pos, neg)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    # the text-encoder-free SDXL conditioning works as well
    out2 = _ksample(sdxl.model, tiny_models.sdxl_conditioning(0), tiny_models.sdxl_conditioning(1))
    assert torch.isfinite(out2["samples"]).all()


# ------------------------------------------------------------------------------------------------
# headless executor


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_run_prompt_txt2img_graph(family):
    prompt = txt2img_prompt(family, filename_prefix=f"harness_{family}")
    outputs = runtime.run_prompt(prompt)
    img = _saved_image(outputs, "7", runtime.work_dir() / "output")
    assert img.shape == (64, 64, 3)
    assert np.isfinite(img).all() and img.std() > 0.01


def test_run_prompt_sampler_custom_advanced_graph():
    prompt = txt2img_prompt("sd15", output="PreviewImage")
    prompt["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
        "latent_image": ["4", 0]}}
    prompt.update({
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["14", 0], "positive": ["2", 0],
                                                     "negative": ["3", 0], "cfg": 5.0}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                          "steps": 2, "denoise": 1.0}},
        "14": {"class_type": "RescaleCFG", "inputs": {"model": ["1", 0], "multiplier": 0.7}},
    })
    outputs = runtime.run_prompt(prompt)
    assert outputs["7"]["images"][0]["type"] == "temp"


def test_run_prompt_reports_validation_and_execution_errors():
    bad = txt2img_prompt("sd15")
    bad["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(runtime.PromptExecutionError, match="sampler_name"):
        runtime.run_prompt(bad)

    # SD1.5 text conditioning (no 1280-wide pooled output) fed to the SDXL model fails at run time
    mixed = txt2img_prompt("sdxl")
    mixed["8"] = {"class_type": "SafeCFGTestTinyModel", "inputs": {"family": "sd15", "seed": 0}}
    mixed["2"]["inputs"]["clip"] = ["8", 1]
    mixed["3"]["inputs"]["clip"] = ["8", 1]
    with pytest.raises(runtime.PromptExecutionError) as info:
        runtime.run_prompt(mixed)
    assert info.value.node_id == "5" and info.value.node_type == "KSampler"


# ------------------------------------------------------------------------------------------------
# real server


@pytest.mark.server
def test_server_loads_tiny_nodes_and_runs_the_graph(comfy_server):
    info = comfy_server.object_info()
    assert "SafeCFGTestTinyModel" in info
    assert info["SafeCFGTestTinyModel"]["output"] == ["MODEL", "CLIP", "VAE"]
    # whatever the pack registers headless it registers in the server too
    missing = [n for n in runtime.pack_node_ids() if n not in info]
    assert not missing, f"pack nodes missing from the server: {missing}\n{comfy_server.log_tail()}"

    entry = comfy_server.run(txt2img_prompt("sd15", filename_prefix="server_smoke"), timeout=60)
    assert entry["status"]["status_str"] == "success"
    img = _saved_image(entry["outputs"], "7", comfy_server.base_dir / "output")
    assert img.shape == (64, 64, 3) and img.std() > 0.01
