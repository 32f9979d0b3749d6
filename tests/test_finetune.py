"""Unsupervised safe fine-tuning on the real runtime with tiny SD1.5 and SDXL models: teacher data,
LoRA fitting, resume, a file ComfyUI's own LoRA loader reads with no unknown keys, strength 0 = base."""

from __future__ import annotations

import json
import logging

import comfy.lora
import comfy.sample
import comfy.samplers
import comfy.sd
import pytest
import torch
from safetensors.torch import load_file

from devtools import comfy as runtime
from safecfg_pack.nodes import finetune_nodes as fn
from safecfg_pack.nodes import hgr_type
from safecfg_pack.safecfg import finetune as ft
from safecfg_pack.safecfg import hgr_net
from safecfg_pack.safecfg.prompts import PromptData

PROMPTS = ["a red knife", "a blue cat", "a skull", "a green house", "a yellow knife", "a tree"]


def random_hgr(latent_format, seed=0):
    torch.manual_seed(seed)
    net = hgr_net.HGRNet(hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hgr_net.LearnedHGR(net, latent_format=latent_format)


def sample(model, clip, text="a red knife", seed=0, steps=3):
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(5.0)
    lat = torch.zeros(1, 4, 8, 8)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return g.sample(comfy.sample.prepare_noise(lat, seed), lat, comfy.samplers.sampler_object("euler"), sig,
                    disable_pbar=True, seed=seed)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_finetune_writes_a_lora_comfy_loads_and_strength_zero_is_the_base(family, request, tmp_path, caplog):
    models = request.getfixturevalue(family)
    hgr = random_hgr("SD15" if family == "sd15" else "SDXL")
    spec = ft.FinetuneSpec(rank=4, steps=6, batch=4, states_per_trajectory=2, traj_steps=3, seed=1, threshold=0.0,
                           temperature=1.0)
    out = tmp_path / "safe.safetensors"
    base_before = {k: v.clone() for k, v in models.model.model.diffusion_model.state_dict().items()}
    summary = fn.run_finetune(models.model, models.clip, PROMPTS, out, spec, redirector=hgr, image_size=64,
                              state_dir=tmp_path / "state")
    assert summary["steps"] == 6 and summary["samples"] == len(PROMPTS) * 2
    # the base model is left exactly as it was (the LoRA was removed after training)
    after = models.model.model.diffusion_model.state_dict()
    assert base_before.keys() == after.keys() and all(torch.equal(base_before[k], after[k]) for k in after)
    sd = load_file(str(out))
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    key_map = comfy.lora.model_lora_keys_unet(models.model.model, {})
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(loaded) == len([k for k in sd if k.endswith(".lora_down.weight")]) > 0
    base = sample(models.model, models.clip)
    zero, _ = comfy.sd.load_lora_for_models(models.model, None, sd, 0.0, 0.0)
    assert torch.equal(sample(zero, models.clip), base)
    one, _ = comfy.sd.load_lora_for_models(models.model, None, sd, 1.0, 0.0)
    assert not torch.equal(sample(one, models.clip), base)


def test_finetune_resumes_and_reuses_teacher_data(sd15, tmp_path):
    hgr = random_hgr("SD15")
    out = tmp_path / "safe.safetensors"
    spec = ft.FinetuneSpec(rank=2, steps=4, batch=4, states_per_trajectory=1, traj_steps=3, seed=0)
    fn.run_finetune(sd15.model, sd15.clip, PROMPTS, out, spec, redirector=hgr, image_size=64,
                    state_dir=tmp_path / "st")
    data_mtime = (tmp_path / "st" / "data.safetensors").stat().st_mtime_ns
    spec.steps = 7
    s2 = fn.run_finetune(sd15.model, sd15.clip, PROMPTS, out, spec, redirector=hgr, image_size=64,
                         state_dir=tmp_path / "st")
    assert s2["steps"] == 7
    assert (tmp_path / "st" / "data.safetensors").stat().st_mtime_ns == data_mtime
    # another detection threshold (a recalibrated HGR) makes other teacher targets: the cached data and
    # the LoRA state are not reused
    spec.threshold = spec.threshold + 0.3
    fn.run_finetune(sd15.model, sd15.clip, PROMPTS, out, spec, redirector=hgr, image_size=64,
                    state_dir=tmp_path / "st")
    assert (tmp_path / "st" / "data.safetensors").stat().st_mtime_ns != data_mtime
    # nor is a LoRA state saved for another rank (its shapes would not fit)
    spec.rank = 3
    s4 = fn.run_finetune(sd15.model, sd15.clip, PROMPTS, out, spec, redirector=hgr, image_size=64,
                         state_dir=tmp_path / "st")
    assert s4["steps"] == 7


def test_soft_scores_drive_the_targets():
    hgr = random_hgr("SD15")
    d_u = torch.randn(3, 4, 8, 8)
    d_c = d_u + torch.randn(3, 4, 8, 8)
    sigma = torch.full((3,), 2.0)
    t_hi, w_hi = ft.unsupervised_targets(hgr, d_c, d_u, sigma, threshold=0.0, temperature=1e-6)
    t_lo, w_lo = ft.unsupervised_targets(hgr, d_c, d_u, sigma, threshold=1e6, temperature=1.0)
    assert torch.allclose(w_hi, torch.ones(3)) and torch.allclose(w_lo, torch.zeros(3))
    red = hgr.redirect(d_c - d_u, sigma, uncond=d_u)
    torch.testing.assert_close(t_hi, d_u + red.g_red)  # fully harmful: SafeCFG's implied prediction
    torch.testing.assert_close(t_lo, d_c)  # clean: the base prediction (preservation)
    sup = ft.supervised_targets(d_c, d_u, torch.tensor([True, False, True]))
    torch.testing.assert_close(sup[1], d_c[1])
    torch.testing.assert_close(sup[0], d_u[0] - (d_c[0] - d_u[0]))


def test_text_hgr_targets_give_safecfg_under_plain_cfg():
    """Where the score is 1, plain CFG on the target is SafeCFG's output with the text HGR,
    ``D_h + cfg (D_c - D_h)``; where the HGR leaves the prompt alone (``D_h = D_u``) the target is the
    base prediction and the score is 0 whatever the threshold's ramp."""
    torch.manual_seed(0)
    d_u = torch.randn(3, 4, 8, 8)
    d_c = d_u + torch.randn(3, 4, 8, 8)
    d_h = d_u + 0.7 * torch.randn(3, 4, 8, 8)
    cfg = 5.0
    t, w = ft.text_targets(d_c, d_u, d_h, threshold=0.0, temperature=1e-6, cfg=cfg)
    assert torch.allclose(w, torch.ones(3))
    torch.testing.assert_close(d_u + cfg * (t - d_u), d_h + cfg * (d_c - d_h))
    t0, w0 = ft.text_targets(d_c, d_u, d_u.clone(), threshold=0.1, temperature=1e-3, cfg=cfg)
    torch.testing.assert_close(t0, d_c)
    assert torch.all(w0 < 1e-6)
    with pytest.raises(ValueError, match="guidance scale above 1"):
        ft.text_targets(d_c, d_u, d_h, 0.0, 1.0, cfg=1.0)


def test_finetune_with_a_text_hgr_follows_safecfg_trajectories(sd15, tmp_path):
    """The safe fine-tune with a text HGR: the teacher trajectories are SafeCFG's with it (another text
    HGR makes other data), the LoRA is written and changes the model; an identity text HGR (clean for
    every prompt) gives targets equal to the base predictions."""
    from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet

    e = sd15.clip.encode_from_tokens_scheduled(sd15.clip.tokenize(""))[0][0][0]
    cfg = TextHGRConfig(embed_dim=e.shape[-1], tokens=e.shape[0], width=32, layers=1, heads=2)
    torch.manual_seed(0)
    identity = TextHGR(TextHGRNet(cfg, e), family="SD15")
    net = TextHGRNet(cfg, e)
    torch.nn.init.normal_(net.out.weight, std=0.2)
    rand = TextHGR(net, family="SD15")
    spec = ft.FinetuneSpec(rank=2, steps=3, batch=4, states_per_trajectory=1, traj_steps=3, seed=0, threshold=0.0,
                           temperature=1.0)
    out = tmp_path / "safe.safetensors"
    fn.run_finetune(sd15.model, sd15.clip, PROMPTS, out, spec, redirector=rand, image_size=64,
                    state_dir=tmp_path / "r")
    fn.run_finetune(sd15.model, sd15.clip, PROMPTS, tmp_path / "id.safetensors", spec, redirector=identity,
                    image_size=64, state_dir=tmp_path / "i")
    data_r = load_file(str(tmp_path / "r" / "data.safetensors"))
    data_i = load_file(str(tmp_path / "i" / "data.safetensors"))
    # the same noise seeds: the states differ only because the trajectories were guided by the HGR
    assert not torch.allclose(data_r["x"], data_i["x"])
    assert not torch.allclose(data_r["target"], data_i["target"])
    # the identity HGR: D_h = D_u, so the targets are D_c (checked against the teacher)
    teacher = fn.ComfyTeacher(sd15.model, sd15.clip, width=64, height=64)
    rows = data_i["prompt"].tolist()
    (d_c,) = teacher.denoise(data_i["x"], data_i["sigma"], [[PROMPTS[i] for i in rows]])
    torch.testing.assert_close(data_i["target"], d_c, atol=1e-5, rtol=1e-4)
    sd = load_file(str(out))
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    one, _ = comfy.sd.load_lora_for_models(sd15.model, None, sd, 1.0, 0.0)
    assert not torch.equal(sample(one, sd15.clip), sample(sd15.model, sd15.clip))


def test_the_empty_prompt_is_kept_as_the_base_model_s(sd15, tmp_path):
    """The teacher data keeps the base ``D(x, "")`` of every state (``target_u``); with ``uncond_weight``
    the LoRA is also fitted to it, through the training predict's row ``-1`` (the empty prompt), so the
    unconditional branch, which every image's CFG multiplies by ``cfg - 1``, drifts less than without it."""
    hgr = random_hgr("SD15", seed=3)
    teacher = fn.ComfyTeacher(sd15.model, sd15.clip, width=64, height=64)
    drift = {}
    for w in (0.0, 1.0):
        spec = ft.FinetuneSpec(rank=4, steps=12, batch=6, lr=1e-2, states_per_trajectory=2, traj_steps=3, seed=2,
                               threshold=0.0, temperature=1.0, uncond_weight=w)
        st = tmp_path / f"st{w}"
        fn.run_finetune(sd15.model, sd15.clip, PROMPTS, tmp_path / f"l{w}.safetensors", spec, redirector=hgr,
                        image_size=64, state_dir=st)
        data = load_file(str(st / "data.safetensors"))
        (d_u,) = teacher.denoise(data["x"], data["sigma"], [[""] * data["x"].shape[0]])
        torch.testing.assert_close(data["target_u"], d_u, atol=1e-5, rtol=1e-4)
        sd = load_file(str(tmp_path / f"l{w}.safetensors"))
        lora_model, _ = comfy.sd.load_lora_for_models(sd15.model, None, sd, 1.0, 0.0)
        lt = fn.ComfyTeacher(lora_model, sd15.clip, width=64, height=64)
        (l_u,) = lt.denoise(data["x"], data["sigma"], [[""] * data["x"].shape[0]])
        (l_c,) = lt.denoise(data["x"], data["sigma"], [[PROMPTS[i] for i in data["prompt"].tolist()]])
        s = data["sigma"].view(-1, 1, 1, 1)
        (d_c,) = teacher.denoise(data["x"], data["sigma"], [[PROMPTS[i] for i in data["prompt"].tolist()]])
        drift[w] = float((((l_u - d_u) / s) ** 2).mean())
        # either way it learned its conditional targets
        assert float((((l_c - data["target"]) / s) ** 2).mean()) < float((((d_c - data["target"]) / s) ** 2).mean())
    assert drift[0.0] > 0 and drift[1.0] < 0.5 * drift[0.0], drift
    # the training predict reads row -1 as the empty prompt
    predict = fn.make_train_predict(teacher, PROMPTS)
    with torch.no_grad():
        sd15.model.pre_run()
        try:
            got = predict(data["x"][:2], data["sigma"][:2], torch.tensor([-1, -1]))
        finally:
            sd15.model.cleanup()
    torch.testing.assert_close(got.float().cpu(), data["target_u"][:2], atol=1e-5, rtol=1e-4)
    # data without target_u (made before the term existed) cannot train it
    from safecfg_pack.safecfg.lora import train_lora

    with pytest.raises(ValueError, match="target_u"):
        train_lora(predict, {}, {k: v for k, v in data.items() if k != "target_u"}, spec)


def test_unlabeled_pool_reads_no_labels(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps({"pairs": [{"harmful": "a knife", "safe": "a spoon", "category": "weapon"}],
                             "clean": ["a cat", "a tree"]}))
    pool = fn.unlabeled_prompts(f)
    assert sorted(pool) == ["a cat", "a knife", "a tree"]  # no safe rewrite, no category
    # the labels are never looked up: a pair file without them, or with values no reader could use, loads
    # the same prompts (the HGR trainer's reader, PromptData.load, refuses a pair without its rewrite)
    for pair in ({"harmful": "a knife"}, {"harmful": "a knife", "safe": {"x": [1]}, "category": 7}):
        g = tmp_path / "unlabelled_pairs.json"
        g.write_text(json.dumps({"pairs": [pair], "clean": ["a cat", "a tree"]}))
        assert sorted(fn.unlabeled_prompts(g)) == ["a cat", "a knife", "a tree"]
        if "safe" not in pair:
            with pytest.raises(ValueError):
                PromptData.load(g)
    for d in (["b", "a "], {"prompts": ["a", "b"]}):
        g = tmp_path / "plain.json"
        g.write_text(json.dumps(d))
        assert sorted(fn.unlabeled_prompts(g)) == ["a", "b"]
    g.write_text(json.dumps({"prompts": ["a", 3]}))
    with pytest.raises(ValueError, match="list of strings"):
        fn.unlabeled_prompts(g)
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert sorted(fn.unlabeled_prompts(t)) == ["one", "two"]


def test_node_rejects_bad_inputs(sd15, tmp_path):
    node = runtime.get_node("HGRSafeFinetune")
    handle = hgr_type.HGRHandle(random_hgr("SD15"), name="t", latent_format="SD15", latent_channels=4)
    kw = dict(model=sd15.model, clip=sd15.clip, hgr=handle, prompts="toyworld_hgr_mini.json", image_size=64,
              steps=2, rank=2, threshold=0.0, seed=0)
    with pytest.raises(ValueError, match="HGRSafeFinetune: filename '../x' must be a plain file name"):
        node.execute(filename="../x", **kw)
    with pytest.raises(ValueError, match="HGRSafeFinetune: prompt file 'nope.json' not found"):
        node.execute(filename="x", **dict(kw, prompts="nope.json"))
    wrong = hgr_type.HGRHandle(random_hgr("SDXL"), name="t", latent_format="SDXL", latent_channels=4)
    with pytest.raises(ValueError, match="HGRSafeFinetune: HGR 't' was trained for the SDXL"):
        node.execute(filename="x", **dict(kw, hgr=wrong))
