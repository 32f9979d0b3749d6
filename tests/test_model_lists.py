"""What the loaders offer and which model an HGR belongs to: the bundled toy files sit under
``toyworld/``, an HGR file records the model it was trained for (a fingerprint of the denoiser's
weights) and says so, with an error for the toy HGRs on any other model and a warning (log and UI)
for a user's HGR on another checkpoint; training caches never land in a model folder."""

from __future__ import annotations

import logging

import pytest
import torch

from devtools import comfy as runtime
from devtools.tiny_nodes import models as tiny_models
from safecfg_pack.nodes import hgr_type
from safecfg_pack.safecfg import hgr_file, hgr_net, model_id


def node_out(node_id, **kw):
    return runtime.get_node(node_id).execute(**kw).result


def test_bundled_toy_files_are_listed_under_toyworld(pack):
    import folder_paths

    hgrs = folder_paths.get_filename_list("hgr")
    assert "toyworld/toyworld_hgr.safetensors" in hgrs and "toyworld/toyworld_text_hgr.safetensors" in hgrs
    loras = folder_paths.get_filename_list("loras")
    assert "toyworld/toyworld_safe_lora.safetensors" in loras
    assert not [n for n in hgrs + loras if "toyworld" in n and not n.startswith("toyworld/")]


@pytest.mark.parametrize("name", ["toyworld/toyworld_hgr.safetensors", "toyworld/toyworld_text_hgr.safetensors"])
def test_bundled_toy_hgr_refuses_another_model_and_drives_the_toy_one(name, sd15, pack):
    (h,) = node_out("HGRLoader", hgr_name=name)
    assert h.trained_for and h.trained_for["toy"]
    with pytest.raises(ValueError, match=r"HGRSafeCFGPatch: HGR 'toyworld/.*' was trained for the toy-world UNet "
                                         r".*but the model connected is SD15 \(.*train an HGR with HGRTrain"):
        h.check_model(sd15.model, "HGRSafeCFGPatch")
    with pytest.raises(ValueError, match="was trained for the toy-world UNet"):
        node_out("HGRSafeCFGPatch", model=sd15.model, hgr=h, strength=1.0, start_percent=0.0, end_percent=1.0)
    from safecfg_pack.toyworld.models import load_unet

    h.check_model(load_unet(), "HGRSafeCFGPatch")  # no error


def test_fingerprint_is_the_model_not_its_dtype_or_lora(sd15):
    a = hgr_type.model_fingerprint(sd15.model)
    assert a["arch"] and len(a["probe"]) == model_id.PROBE_TENSORS * model_id.PROBE_VALUES
    assert any(abs(v) > 1e-4 for v in a["probe"]), "the probe reads real weight values"
    other = hgr_type.model_fingerprint(tiny_models.tiny_sd15(1))
    assert other["arch"] == a["arch"] and not model_id.same_model(a, other)
    assert not model_id.same_model(a, hgr_type.model_fingerprint(tiny_models.tiny_sdxl(0)))
    # the same weights in half precision are the same model
    half = tiny_models.tiny_sd15(0)
    half.model.diffusion_model.to(torch.float16)
    assert model_id.same_model(a, hgr_type.model_fingerprint(half))
    # the same weights stored as scaled fp8 (8-bit floats, plus the scale parameters such files add)
    # are the same model, read more loosely; another model in fp8 is still another model
    def as_fp8(seed):
        m = tiny_models.tiny_sd15(seed)
        dm = m.model.diffusion_model
        for p in dm.parameters():
            p.data = p.data.to(torch.float8_e4m3fn)
        dm.out[-1].register_parameter("scale_weight", torch.nn.Parameter(torch.ones(()), requires_grad=False))
        return hgr_type.model_fingerprint(m)

    fp8 = as_fp8(0)
    assert fp8["lossy"] and fp8["arch"] == a["arch"] and not a.get("lossy")
    assert model_id.same_model(a, fp8) and not model_id.same_model(a, as_fp8(1))
    # a patch applied in place (as a LoRA is, when ComfyUI loads the model) does not change it
    patched = sd15.model.clone()
    key = next(k for k in patched.model_state_dict() if k.endswith(".bias") and "diffusion_model." in k)
    patched.add_patches({key: (torch.ones_like(patched.model_state_dict()[key]),)}, 1.0)
    patched.patch_model()
    try:
        assert model_id.same_model(a, hgr_type.model_fingerprint(patched))
    finally:
        patched.unpatch_model()


def test_fp8_weights_match_their_model_within_the_lossy_tolerance():
    """Real weights stored in fp8 (e4m3) differ from the original by about 2 % on average, at the edge
    of the strict tolerance: their fingerprint is marked lossy and still matches; another model's does
    not."""
    gen = torch.Generator().manual_seed(0)
    named = {f"block{i}.bias": torch.randn(64, generator=gen) * 0.1 for i in range(model_id.PROBE_TENSORS)}
    other = {k: torch.randn(64, generator=gen) * 0.1 for k in named}
    a = model_id.fingerprint(named)
    fp8 = model_id.fingerprint({k: v.to(torch.float8_e4m3fn) for k, v in named.items()})
    ta, tb = torch.tensor(a["probe"]), torch.tensor(fp8["probe"])
    rel = float((ta - tb).abs().mean() / ((ta.abs().mean() + tb.abs().mean()) / 2))
    assert 0.005 < rel < model_id.PROBE_TOLERANCE_LOSSY, rel
    assert fp8["lossy"] and model_id.same_model(a, fp8)
    assert not model_id.same_model(fp8, model_id.fingerprint({k: v.to(torch.float8_e4m3fn) for k, v in other.items()}))


def test_a_users_hgr_warns_on_another_checkpoint(sd15, tmp_path, caplog, pack):
    import folder_paths

    cfg = hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16)
    hgr = hgr_net.LearnedHGR(hgr_net.HGRNet(cfg), latent_format="SD15")
    d = tmp_path / "hgr"
    hgr_file.save_hgr(d / "mine.safetensors", hgr, trained_for=hgr_type.model_fingerprint(sd15.model, name="mine.ckpt"))
    folder_paths.add_model_folder_path("hgr", str(d))
    (h,) = node_out("HGRLoader", hgr_name="mine.safetensors")
    with caplog.at_level(logging.WARNING):
        h.check_model(sd15.model, "HGRSafeCFGGuider")
    assert not [r for r in caplog.records if "trained for" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        h.check_model(tiny_models.tiny_sd15(1), "HGRSafeCFGGuider")  # a warning, not an error
    msgs = [r.getMessage() for r in caplog.records if "trained for" in r.getMessage()]
    assert msgs and "HGRSafeCFGGuider: HGR 'mine.safetensors' was trained for mine.ckpt (" in msgs[0]
    assert "the model connected is SD15 (" in msgs[0] and "HGRTrain" in msgs[0]
    # the toast: to the client whose prompt runs, once per prompt
    from server import PromptServer

    srv = PromptServer.instance
    old = (srv.client_id, srv.last_prompt_id)
    try:
        srv.client_id, srv.last_prompt_id = "client-a", "prompt-1"
        start = len(srv.messages)
        for prompt in ("prompt-1", "prompt-1", "prompt-2"):
            srv.last_prompt_id = prompt
            h.check_model(tiny_models.tiny_sd15(1), "HGRSafeCFGGuider")
        toasts = [m for m in srv.messages[start:] if m[0] == "safecfg.warning"]
        assert len(toasts) == 2 and all(m[2] == "client-a" for m in toasts)
        assert toasts[0][1]["message"] == msgs[0]
    finally:
        srv.client_id, srv.last_prompt_id = old


def test_trained_for_metadata_is_validated(tmp_path):
    cfg = hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16)
    path = hgr_file.save_hgr(tmp_path / "a.safetensors", hgr_net.LearnedHGR(hgr_net.HGRNet(cfg), latent_format="SD15"))
    assert hgr_file.load_hgr(path).trained_for is None  # files without one load, unchecked
    before = hgr_file.load_hgr(path).net.state_dict()
    hgr_file.stamp_trained_for(path, {"arch": "abc", "probe": [0.5, 1.0]})
    after = hgr_file.load_hgr(path)
    assert after.trained_for["arch"] == "abc"
    assert all(torch.equal(before[k], v) for k, v in after.net.state_dict().items())
    # the model's name reaches log lines and UI messages: printable, 100 characters at most
    hgr_file.stamp_trained_for(path, {"arch": "abc", "probe": [0.5], "name": "ckpt\x1b[31m\n" + "x" * 500})
    name = hgr_file.load_hgr(path).trained_for["name"]
    assert name.startswith("ckpt[31m") and len(name) == 100 and name.isprintable()
    for bad in ({"arch": 3, "probe": "x"}, {"arch": "a" * 129, "probe": [0.5]}):
        hgr_file.stamp_trained_for(path, bad)
        with pytest.raises(hgr_file.HGRFileError, match="'trained_for' metadata is not a model fingerprint"):
            hgr_file.load_hgr(path)
