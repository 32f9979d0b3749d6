"""The paper's HGR (a Transformer over the text embedding, in CFG's unconditional branch): its file,
and the guider and patch with it on the real ComfyUI runtime and a tiny seeded SD1.5 model."""

from __future__ import annotations

import folder_paths
import pytest
import torch
from test_guidance import core_guider, encode, ksample, latent, node_out, safe_guider, safe_patch, sample_guider

from safecfg_pack.safecfg import hgr_file
from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet


def _empty(clip):
    return encode(clip, "")[0][0][0]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """An untrained (identity) and a random text HGR for the tiny SD1.5 CLIP, and one for another width."""
    from devtools.tiny_nodes import models as tiny_models

    clip = tiny_models.tiny_sd15_clip(0)
    e = _empty(clip)
    d = tmp_path_factory.mktemp("text_hgr")
    cfg = TextHGRConfig(embed_dim=e.shape[-1], tokens=e.shape[0], width=32, layers=1, heads=2)
    torch.manual_seed(0)
    hgr_file.save_hgr(d / "text_identity.safetensors", TextHGR(TextHGRNet(cfg, e), family="SD15"))
    net = TextHGRNet(cfg, e)
    torch.nn.init.normal_(net.out.weight, std=0.2)
    hgr_file.save_hgr(d / "text_random.safetensors", TextHGR(net, family="SD15", categories=["weapon"]))
    # with a rewriter whose gate opens between the distances of "a blue circle" (closed) and "a red knife"
    rw = TextHGRNet(TextHGRConfig(embed_dim=e.shape[-1], tokens=e.shape[0], width=32, layers=1, heads=2,
                                  rewrite=1), e)
    rw.load_state_dict(net.state_dict(), strict=False)
    torch.nn.init.normal_(rw.rewriter.out.weight, std=0.2)
    d_clean, d_harm = (float(TextHGR(net).distance(encode(clip, t)[0][0])) for t in ("a blue circle", "a red knife"))
    assert d_clean != d_harm
    lo, hi = sorted((d_clean, d_harm))
    rw.rewrite_gate.copy_(torch.tensor([lo + 0.1 * (hi - lo), lo + 0.5 * (hi - lo)]))
    hgr_file.save_hgr(d / "text_rewrite.safetensors", TextHGR(rw, family="SD15", categories=["weapon"]))
    d.joinpath("rewrite_prompts.txt").write_text("a blue circle\na red knife\n" if d_harm > d_clean
                                                 else "a red knife\na blue circle\n")
    wide = TextHGRConfig(embed_dim=e.shape[-1] * 2, tokens=e.shape[0], width=32, layers=1, heads=2)
    hgr_file.save_hgr(d / "text_wide.safetensors", TextHGR(TextHGRNet(wide), family="OTHER"))
    folder_paths.add_model_folder_path("hgr", str(d))
    return d


def load(name):
    (h,) = node_out("HGRLoader", hgr_name=name)
    return h


def test_file_round_trip_and_validation(text_dir, tmp_path):
    h = hgr_file.load_hgr(text_dir / "text_random.safetensors")
    assert h.kind == "text" and h.family == "SD15" and h.categories == ["weapon"]
    c = torch.randn(2, h.config.tokens * 2, h.config.embed_dim)
    again = hgr_file.load_hgr(text_dir / "text_random.safetensors")
    assert torch.equal(h.uncond(c), again.uncond(c))
    with pytest.raises(hgr_file.HGRFileError, match="'SD15' text encoder but the model is 'SDXL'"):
        hgr_file.load_hgr(text_dir / "text_random.safetensors", family="SDXL")
    # a tampered shape is refused from the header, before any tensor is read
    from safetensors.torch import load_file, save_file

    from safecfg_pack.safecfg.hgr_file import read_header

    _, meta = read_header(text_dir / "text_random.safetensors")
    sd = load_file(str(text_dir / "text_random.safetensors"))
    sd["empty"] = sd["empty"][:-1]
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(hgr_file.HGRFileError, match="tensor 'empty' has shape"):
        hgr_file.load_hgr(tmp_path / "bad.safetensors")


def test_untrained_text_hgr_is_the_identity_on_cfg(sd15, text_dir, pack):
    """An untrained HGR returns the negative unchanged: guider and patch bit-identical to core CFG."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    h = load("text_identity.safetensors")
    ref = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, h), model, latent()), ref)
    assert torch.equal(ksample(safe_patch(model, h), pos, neg), ksample(model, pos, neg))


def test_text_hgr_replaces_the_negative_embedding_in_guider_and_patch(sd15, text_dir, pack):
    """Inside the window the unconditional branch sees ``n + s * Delta(c)``: the guider equals core CFG
    with that negative, the KSampler patch equals the guider, and the user's negative prompt is kept
    as the base the correction is added to."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red knife"), encode(clip, "blurry")
    h = load("text_random.safetensors")
    red = h.redirector
    want_neg = [[neg[0][0] + 0.7 * red.net.delta(pos[0][0]).detach(), dict(neg[0][1])]]
    ref = sample_guider(core_guider(model, pos, want_neg, 5.0), model, latent())
    got = sample_guider(safe_guider(model, pos, neg, h, strength=0.7), model, latent())
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()
    plain = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()
    patched = ksample(safe_patch(model, h, strength=0.7), pos, neg)
    want = ksample(model, pos, want_neg)
    assert (patched - want).abs().max() <= 1e-5 * want.abs().max()
    # outside the window the user's own negative is used: an empty window is plain CFG
    assert torch.equal(ksample(safe_patch(model, h, start=0.5, end=0.5), pos, neg), ksample(model, pos, neg))


def test_text_hgr_once_per_prompt_not_per_step(sd15, text_dir, pack, monkeypatch):
    """``Delta(c)`` is computed once per run and prompt (never per sampling step) in the patch and the
    guider."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    h = load("text_random.safetensors")
    calls = []
    orig = h.redirector.net.delta

    def counted(c):
        calls.append(tuple(c.shape))
        return orig(c)

    monkeypatch.setattr(h.redirector.net, "delta", counted)
    ksample(safe_patch(model, h), pos, neg, steps=6)
    assert len(calls) == 1
    calls.clear()
    sample_guider(safe_guider(model, pos, neg, h), model, latent(), steps=6)
    assert len(calls) == 1


def test_text_hgr_for_another_encoder_is_refused_naming_node_and_widths(sd15, text_dir, pack):
    model, clip, _ = sd15
    h = load("text_wide.safetensors")
    with pytest.raises(ValueError, match=r"HGRSafeCFGPatch: text HGR 'text_wide.safetensors' reads \d+-wide"):
        safe_patch(model, h)


def test_text_negative_node_feeds_a_stock_ksampler(sd15, text_dir, pack):
    """`HGRTextNegative` gives HGR(c) as a CONDITIONING: a stock KSampler with it equals the patch; a
    latent HGR is refused with the node's name and the fix."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    h = load("text_random.safetensors")
    hneg, hpos = node_out("HGRTextNegative", positive=pos, negative=neg, hgr=h, strength=1.0)
    assert hpos[0][0] is pos[0][0]  # no rewriter: the positive as given
    want = ksample(safe_patch(model, h), pos, neg)
    got = ksample(model, pos, hneg)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    same, _ = node_out("HGRTextNegative", positive=pos, negative=neg, hgr=h, strength=0.0)
    assert torch.equal(same[0][0], neg[0][0])
    (concept,) = node_out("HGRConceptRedirector", clip=clip, concepts="knife", threshold=0.2, push=0.0,
                          mode="global")
    with pytest.raises(ValueError, match="HGRTextNegative: .* not a text-embedding HGR"):
        node_out("HGRTextNegative", positive=pos, negative=neg, hgr=concept, strength=1.0)


def test_rewriter_rewrites_a_harmful_positive_and_leaves_a_clean_one_bit_for_bit(sd15, text_dir, pack):
    """A text HGR with a rewriter: for a prompt past its gate the conditional branch sees
    ``c + Delta_r(c)`` and the unconditional ``n + s * Delta(c + Delta_r(c))`` (the guider equals core
    CFG with both, the patch and HGRTextNegative's two outputs into a stock KSampler equal the guider);
    a prompt below the gate keeps its positive bit for bit, so it samples exactly as the same HGR
    without a rewriter; at cfg 1 the HGR's cfg-1 form reads the rewritten prompt."""
    model, clip, _ = sd15
    clean_text, harm_text = (text_dir / "rewrite_prompts.txt").read_text().split("\n")[:2]
    h = load("text_rewrite.safetensors")
    red = h.redirector
    assert red.rewrites and h.redirector.config.rewrite == 1
    neg = encode(clip, "blurry")
    pos = encode(clip, harm_text)
    c = pos[0][0]
    assert float(red.rewrite_gate(c)) == 1.0
    c_rw = c + 0.7 * red.net.rewriter(c).detach()  # the rewrite scales with strength up to 1
    want_pos = [[c_rw, dict(pos[0][1])]]
    want_neg = [[neg[0][0] + 0.7 * red.net.delta(c_rw).detach(), dict(neg[0][1])]]
    ref = sample_guider(core_guider(model, want_pos, want_neg, 5.0), model, latent())
    got = sample_guider(safe_guider(model, pos, neg, h, strength=0.7), model, latent())
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()
    patched = ksample(safe_patch(model, h, strength=0.7), pos, neg)
    want = ksample(model, want_pos, want_neg)
    assert (patched - want).abs().max() <= 1e-5 * want.abs().max()
    hneg, hpos = node_out("HGRTextNegative", positive=pos, negative=neg, hgr=h, strength=0.7)
    stock = ksample(model, hpos, hneg)
    assert (stock - want).abs().max() <= 1e-5 * want.abs().max()
    # the detector's distance reads the prompt as given, not the rewrite
    got_u, want_u = red.uncond(c, rewritten=False), red.net.empty[None] + red.net.delta(c).detach()
    assert (got_u - want_u).abs().max() <= 1e-5 * want_u.abs().max(), (got_u - want_u).abs().max()
    # below the gate: the very same positive tensor, and the sample of the HGR without a rewriter
    clean = encode(clip, clean_text)
    assert float(red.rewrite_gate(clean[0][0])) == 0.0
    assert red.rewrite(clean[0][0]) is clean[0][0]
    plain_hgr = load("text_random.safetensors")
    assert torch.equal(ksample(safe_patch(model, h), clean, neg), ksample(safe_patch(model, plain_hgr), clean, neg))
    # at cfg 1 the rewrite applies and so does the paper's HGR in its cfg-1 form, read on the rewritten
    # prompt: D(c') - (w - 1) / w * (D(n + Delta(c')) - D(n)), w its training cfg (checked at every step
    # against separate model calls), in the patch and the guider alike
    import comfy.sampler_helpers
    import comfy.samplers

    c1 = c + red.net.rewriter(c).detach()
    u1 = neg[0][0] + red.net.delta(c1).detach()
    k = (red.train_cfg - 1.0) / red.train_cfg
    errs = []

    def post(args):
        m, x, s = args["model"], args["input"], args["sigma"]
        rows = [[[c1, dict(pos[0][1])]], [[u1, dict(neg[0][1])]], neg]
        enc = [comfy.samplers.encode_model_conds(m.extra_conds, comfy.sampler_helpers.convert_cond(r), x, x.device,
                                                 "positive") for r in rows]
        d_c, d_h, d_n = comfy.samplers.calc_cond_batch(m, enc, x, s, {})
        errs.append(float((args["denoised"] - (d_c - k * (d_h - d_n))).abs().max() / d_c.abs().max()))
        return args["denoised"]

    patched1 = safe_patch(model, h)
    patched1.set_model_sampler_post_cfg_function(post)
    got1 = ksample(patched1, pos, neg, cfg=1.0)
    assert errs and max(errs) < 1e-5, errs
    rewrite_only = ksample(model, [[c1, dict(pos[0][1])]], neg, cfg=1.0)
    assert (got1 - rewrite_only).abs().max() > 1e-3 * rewrite_only.abs().max()
    assert (got1 - ksample(model, pos, neg, cfg=1.0)).abs().max() > 1e-3 * rewrite_only.abs().max()
    g1 = sample_guider(safe_guider(model, pos, neg, h, cfg=1.0), model, latent())
    assert (g1 - got1).abs().max() <= 1e-5 * got1.abs().max()
    # strength 0 and an empty window: core CFG bit for bit, the rewrite included
    assert torch.equal(ksample(safe_patch(model, h, strength=0.0), pos, neg), ksample(model, pos, neg))
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, h, start=0.5, end=0.5), model, latent()),
                       sample_guider(core_guider(model, pos, neg, 5.0), model, latent()))


def test_rewriter_file_round_trip_and_a_gate_that_does_not_rise_is_refused(text_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from safecfg_pack.safecfg.hgr_file import read_header

    path = text_dir / "text_rewrite.safetensors"
    h, again = hgr_file.load_hgr(path), hgr_file.load_hgr(path)
    c = torch.randn(3, h.config.tokens, h.config.embed_dim)
    assert h.rewrites and torch.equal(h.rewrite(c), again.rewrite(c))
    _, meta = read_header(path)
    sd = load_file(str(path))
    sd["rewrite_gate"] = sd["rewrite_gate"].flip(0)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(hgr_file.HGRFileError, match="rewrite gate .* does not rise"):
        hgr_file.load_hgr(tmp_path / "bad.safetensors")


def test_add_rewriter_fits_embedding_pairs_and_closes_the_gate_on_clean_prompts(sd15, text_dir, pack):
    """The rewriter's fit on a tiny CLIP: the validation loss falls below the identity's, the paper's
    HGR inside is untouched, the gate is closed for (nearly all) clean training prompts, and a
    harmful prompt past it moves towards its rewrite's embedding."""
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg.prompts import PromptData
    from safecfg_pack.safecfg.text_train import RewriteSpec, add_rewriter

    model, clip, _ = sd15
    t = ComfyTeacher(model, clip, width=64, height=64)
    harm = [f"a {c} knife" for c in ("red", "blue", "green", "yellow", "purple", "orange")]
    safe = [p.replace("knife", "spoon") for p in harm]
    clean = [f"a {c} {o}" for c in ("red", "blue", "green") for o in ("circle", "square", "star")]
    data = PromptData(harm, safe, ["weapon"] * len(harm), clean)
    base = hgr_file.load_hgr(text_dir / "text_random.safetensors")
    hgr, summary = add_rewriter(base, t.embed, data, RewriteSpec(steps=60, batch=8, lr=2e-3, val_fraction=0.0))
    assert summary["val_loss"] < 0.5 * summary["identity_val_loss"], summary
    for k, v in base.net.state_dict().items():
        assert torch.equal(hgr.net.state_dict()[k], v), k
    lo, hi = summary["gate"]
    assert lo < hi
    e_clean = t.embed(clean)
    assert float((hgr.rewrite_gate(e_clean) > 0).float().mean()) <= 0.2
    e_h, e_s = t.embed(harm), t.embed(safe)
    opened = hgr.rewrite_gate(e_h) > 0
    if opened.any():  # the random HGR's distances decide which harmful prompts pass its gate
        moved = hgr.rewrite(e_h)[opened]
        assert (moved - e_s[opened]).norm() < (e_h[opened] - e_s[opened]).norm()


def test_text_hgr_training_moves_towards_its_target_on_a_tiny_model(sd15, pack):
    """Teacher states from the model's own trajectories, the target derived from CFG on the safe
    rewrite, and a fit through the frozen denoiser: the validation loss falls below the identity's,
    and the guided output at a harmful state moves towards plain CFG's on the rewrite."""
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg.prompts import PromptData
    from safecfg_pack.safecfg.text_train import (
        TextFitSpec,
        TextStatesSpec,
        build_states,
        fit_text_hgr,
        unconditional_target,
    )

    model, clip, _ = sd15
    t = ComfyTeacher(model, clip, width=64, height=64)
    # the target: CFG with it as the unconditional prediction equals CFG on the rewrite
    d_c, d_s, d_e = torch.randn(3, 2, 4, 8, 8).unbind(0)
    u = unconditional_target(d_c, d_s, d_e, 5.0)
    assert torch.allclose(u + 5.0 * (d_c - u), d_e + 5.0 * (d_s - d_e), atol=1e-5)
    assert torch.equal(unconditional_target(d_c, d_c, d_e, 5.0), d_e)
    data = PromptData(harmful=["a red knife", "a blue skull", "a green knife on dots"],
                      safe=["a red spoon", "a blue circle", "a green spoon on dots"],
                      categories=["weapon", "gore", "weapon"], clean=["a red circle", "a star", "a moon"])
    states = build_states(t, data, TextStatesSpec(states_per_trajectory=3, steps=6, batch=6))
    assert states["x"].shape[0] == 18 and states["embeddings"].shape[0] == 6
    e = t.empty_embedding()
    cfg = TextHGRConfig(embed_dim=e.shape[-1], tokens=e.shape[0], width=32, layers=1, heads=2)
    hgr, summary = fit_text_hgr(t, states, cfg, e, TextFitSpec(steps=60, batch=8, lr=2e-3, eval_every=20,
                                                               val_fraction=0.0))
    assert summary["val_loss"] < 0.8 * summary["identity_val_loss"], summary
    # gradients reached the HGR only: the denoiser's weights (trainable tensors) never got one
    params = list(model.model.parameters())
    assert any(p.requires_grad for p in params) and all(p.grad is None for p in params)



def test_on_policy_rounds_sample_with_the_hgr_and_resume_from_the_cache(sd15, pack, tmp_path):
    """DAgger-style rounds: the round's states come from trajectories whose unconditional branch is
    the HGR fitted so far (so they differ from plain CFG's at the same noise), they are cached keyed
    by those weights, and a rerun from the written file (``init``) reuses the first round's states."""
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg.prompts import PromptData
    from safecfg_pack.safecfg.text_train import (
        TextFitSpec,
        TextStatesSpec,
        build_states,
        merge_states,
        train_text_hgr,
    )

    model, clip, _ = sd15
    t = ComfyTeacher(model, clip, width=64, height=64)
    data = PromptData(harmful=["a red knife", "a blue skull and a star"],
                      safe=["a red spoon", "a blue circle and a star"], categories=["weapon", "gore"],
                      clean=["a red circle", "a moon"])
    spec = TextStatesSpec(states_per_trajectory=2, steps=5, batch=4)
    fit = TextFitSpec(steps=30, batch=4, lr=2e-3, eval_every=10, val_fraction=0.0)
    hgr, summary = train_text_hgr(t, data, tmp_path / "cache", tmp_path / "h.safetensors", spec=spec, fit_spec=fit,
                                  width=32, on_policy_rounds=1, round_fit_steps=10)
    assert (tmp_path / "cache" / "text_states_on_policy_1.safetensors").is_file()
    assert summary["states"] == 2 * 4 * 2 and len(summary["on_policy_rounds"]) == 1
    # the on-policy round's trajectories are not plain CFG's (same prompts, same noise)
    plain = build_states(t, data, spec, round_=1)
    policy = build_states(t, data, spec, policy=hgr, round_=1)
    assert torch.equal(plain["embeddings"], policy["embeddings"])
    assert not torch.allclose(plain["x"], policy["x"], atol=1e-4)
    assert merge_states([plain, policy])["x"].shape[0] == 2 * plain["x"].shape[0]
    # resumed from the written file: the first round's states are read back, not rebuilt
    f = tmp_path / "cache" / "text_states.safetensors"
    stamp = f.stat().st_mtime_ns
    again, s2 = train_text_hgr(t, data, tmp_path / "cache", tmp_path / "h2.safetensors", spec=spec, fit_spec=fit,
                               width=32, on_policy_rounds=1, round_fit_steps=5,
                               init=hgr_file.load_hgr(tmp_path / "h.safetensors"))
    assert f.stat().st_mtime_ns == stamp and "init" in s2
    assert hgr_file.load_hgr(tmp_path / "h2.safetensors").kind == "text"


def test_harm_detector_scores_images_with_a_text_hgr_and_its_prompt(sd15, text_dir, pack):
    """The detector measures a text HGR's harmful Euclidean distance on the model's scores, with the
    prompt: the identity HGR scores 0, a trained-away-from-identity one more; without the prompt it
    says what to connect."""
    from test_detect import detect, images

    model, clip, _ = sd15
    imgs = images(2)
    pos = encode(clip, "a red knife")
    zero = detect(sd15, imgs, load("text_identity.safetensors"), positive=pos)
    moved = detect(sd15, imgs, load("text_random.safetensors"), positive=pos)
    assert torch.all(zero.scores.abs() < 1e-5) and torch.all(moved.scores > 1e-3)
    assert torch.isfinite(moved.scores).all() and moved.scores.shape == (2,)
    with pytest.raises(ValueError, match="HGRHarmDetector: text HGR 'text_random.safetensors' .* connect 'positive'"):
        detect(sd15, imgs, load("text_random.safetensors"))


def test_rewriter_on_a_long_prompt_of_several_chunks(sd15, text_dir, pack):
    """A prompt of 150+ tokens (several CLIP chunks) is rewritten chunk by chunk with one gate for the
    whole prompt, and the patch samples exactly as core CFG with the rewritten conditionings."""
    model, clip, _ = sd15
    h = load("text_rewrite.safetensors")
    red = h.redirector
    saved = red.net.rewrite_gate.clone()
    red.net.rewrite_gate.copy_(torch.tensor([-2.0, -1.0]))  # always open: the rewrite runs for any prompt
    try:
        pos = encode(clip, ", ".join(["a red knife on a blue striped background"] * 20))
        neg = encode(clip, "")
        c = pos[0][0]
        t = red.config.tokens
        assert c.shape[1] >= 2 * t
        rw = red.rewrite(c)
        for k in range(c.shape[1] // t):
            chunk = c[:, k * t:(k + 1) * t]
            want = chunk + red.net.rewriter(chunk).detach()
            assert (rw[:, k * t:(k + 1) * t] - want).abs().max() <= 1e-5 * want.abs().max()
        want_pos = [[rw, dict(pos[0][1])]]
        want_neg = [[red.uncond(c, 1.0, base=neg[0][0]), dict(neg[0][1])]]
        assert want_neg[0][0].shape[1] == c.shape[1]  # the empty negative repeated to the prompt's length
        got = ksample(safe_patch(model, h), pos, neg)
        want = ksample(model, want_pos, want_neg)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    finally:
        red.net.rewrite_gate.copy_(saved)
