"""The pack in a real ComfyUI server (main.py --cpu on loopback): registration and POST /prompt."""

from __future__ import annotations

import pytest

from devtools import comfy as runtime
from devtools.graphs import txt2img_prompt

PACK_NODES = {"HGRLoader", "HGRConceptRedirector", "HGRSafeCFGGuider", "HGRSafeCFGPatch"}


def safecfg_graph(seed: int = 3) -> dict:
    """Tiny model -> concept redirector -> (a) HGRSafeCFGPatch + KSampler, (b) HGRSafeCFGGuider +
    SamplerCustomAdvanced; both decoded and saved."""
    p = txt2img_prompt("sd15", seed=seed, steps=3, positive="a knife on a table", filename_prefix="patch")
    p["10"] = {"class_type": "HGRConceptRedirector", "inputs": {
        "clip": ["1", 1], "concepts": "weapons: a knife", "threshold": 0.2, "push": 0.0, "mode": "global"}}
    p["11"] = {"class_type": "HGRSafeCFGPatch", "inputs": {
        "model": ["1", 0], "hgr": ["10", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    p["5"]["inputs"]["model"] = ["11", 0]
    p["12"] = {"class_type": "HGRSafeCFGGuider", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "hgr": ["10", 0], "cfg": 5.0,
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    p["13"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["14"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3,
                                                          "denoise": 1.0}}
    p["15"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    p["16"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["15", 0], "guider": ["12", 0], "sampler": ["13", 0], "sigmas": ["14", 0], "latent_image": ["4", 0]}}
    p["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}}
    p["18"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "guider"}}
    return p


def test_graph_runs_headless():
    out = runtime.run_prompt(safecfg_graph())
    assert {"7", "18"} <= set(out)


@pytest.mark.server
def test_server_registers_every_node_and_runs_guider_and_patch(comfy_server):
    info = comfy_server.object_info()
    missing = PACK_NODES - set(info)
    assert not missing, f"missing from /object_info: {missing}\n{comfy_server.log_tail()}"
    for nid in PACK_NODES:
        assert info[nid]["category"] == "SafeCFG"
        for section in ("required", "optional"):
            for name, spec in info[nid]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{nid}.{name} has no tooltip in /object_info"
    assert info["HGRSafeCFGGuider"]["output"] == ["GUIDER"]
    assert info["HGRSafeCFGPatch"]["output"] == ["MODEL"]
    assert info["HGRLoader"]["output"] == ["HGR"]
    entry = comfy_server.run(safecfg_graph(), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    for node in ("7", "18"):
        images = entry["outputs"][node]["images"]
        assert len(images) == 1 and (comfy_server.base_dir / "output" / images[0]["filename"]).is_file()


@pytest.mark.server
def test_server_reports_bad_input_without_dying(comfy_server):
    bad = safecfg_graph()
    bad["10"]["inputs"]["concepts"] = "   "
    from devtools.server import ComfyServerError

    with pytest.raises(ComfyServerError) as e:
        comfy_server.run(bad, timeout=120)
    msg = str(e.value)
    assert "HGRConceptRedirector: 'concepts' is empty" in msg and "one harmful concept per line" in msg
    # the server is still alive and serves the next prompt
    assert comfy_server.run(safecfg_graph(seed=4), timeout=120)["status"]["status_str"] == "success"
