"""SafeCFG guider and KSampler patch on the real ComfyUI runtime with tiny seeded models."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import folder_paths
import nodes
import pytest
import torch

from devtools import comfy as runtime
from safecfg_pack.safecfg import hgr_file, hgr_net

STEPS = 4



def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def node_out(node_id, **kw):
    """Run a node's execute (V3) or function (V1) and return its outputs tuple."""
    cls = runtime.get_node(node_id)
    if hasattr(cls, "execute") and hasattr(cls, "define_schema"):
        return tuple(cls.execute(**kw).result)
    obj = cls()
    return getattr(obj, cls.FUNCTION)(**kw)


def latent(batch=1, side=8, seed=0):
    return {"samples": torch.zeros(batch, 4, side, side)}


def sample_guider(guider, model, lat, seed=0, steps=STEPS):
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = comfy.sample.prepare_noise(lat["samples"], seed)
    return guider.sample(noise, lat["samples"], sampler, sigmas, disable_pbar=True, seed=seed)


def ksample(model, pos, neg, cfg=5.0, lat=None, seed=0, steps=STEPS):
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", pos, neg, lat or latent())[0]["samples"]


def pushing_concepts_with_state_spy(clip):
    """A concept redirector with push memory (per-run state) whose every redirect call appends the
    state dict it was given to the returned list."""
    (red,) = node_out("HGRConceptRedirector", clip=clip, concepts="a knife\na sharp blade", threshold=-1.0,
                      push=1.0, mode="global", push_threshold=0.3, push_memory=0.9)
    states = []
    inner = red.redirector.redirect

    def spy(g, sigma, **kw):
        states.append(kw.get("state"))
        return inner(g, sigma, **kw)

    red.redirector.redirect = spy
    return red, states


def core_guider(model, pos, neg, cfg):
    (g,) = node_out("CFGGuider", model=model, positive=pos, negative=neg, cfg=cfg)
    return g


def safe_guider(model, pos, neg, hgr, cfg=5.0, strength=1.0, start=0.0, end=1.0):
    (g,) = node_out("HGRSafeCFGGuider", model=model, positive=pos, negative=neg, hgr=hgr, cfg=cfg,
                    strength=strength, start_percent=start, end_percent=end)
    return g


def safe_patch(model, hgr, strength=1.0, start=0.0, end=1.0):
    (m,) = node_out("HGRSafeCFGPatch", model=model, hgr=hgr, strength=strength, start_percent=start, end_percent=end)
    return m


def concept(clip, text, threshold=-1.0, push=0.0, mode="global"):
    (h,) = node_out("HGRConceptRedirector", clip=clip, concepts=text, threshold=threshold, push=push, mode=mode)
    return h


@pytest.fixture(scope="module")
def hgr_dir(tmp_path_factory):
    """Two HGR files in a folder registered as models/hgr: an untrained (identity) and a random one."""
    d = tmp_path_factory.mktemp("hgr")
    torch.manual_seed(0)
    cfg = hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16)
    hgr_file.save_hgr(d / "identity.safetensors", hgr_net.LearnedHGR(hgr_net.HGRNet(cfg), latent_format="SD15"))
    net = hgr_net.HGRNet(cfg)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    hgr_file.save_hgr(d / "random.safetensors", hgr_net.LearnedHGR(net, latent_format="SD15"))
    hgr_file.save_hgr(d / "random_sdxl.safetensors", hgr_net.LearnedHGR(net, latent_format="SDXL"))
    folder_paths.add_model_folder_path("hgr", str(d))
    return d


def load(name):
    (h,) = node_out("HGRLoader", hgr_name=name)
    return h


# ------------------------------------------------------------------------------------------------


def test_pack_registers_nodes_with_tooltips(pack):
    expected = {"HGRLoader", "HGRConceptRedirector", "HGRSafeCFGGuider", "HGRSafeCFGPatch"}
    assert expected <= set(pack)
    for nid in expected:
        schema = runtime.get_node(nid).GET_SCHEMA()
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 20, f"{nid}.{inp.id} has no useful tooltip"


@pytest.mark.parametrize("variant", ["strength0", "empty_window", "late_window", "identity"])
def test_guider_bit_identical_to_core_when_neutral(sd15, hgr_dir, variant):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "blurry")
    hgr = load("identity.safetensors") if variant == "identity" else concept(clip, "a red cat")
    kw = {"strength0": dict(strength=0.0), "empty_window": dict(start=0.6, end=0.6),
          "late_window": dict(start=1.0, end=1.0), "identity": {}}[variant]
    ref = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    out = sample_guider(safe_guider(model, pos, neg, hgr, **kw), model, latent())
    assert torch.equal(ref, out)


@pytest.mark.parametrize("variant", ["strength0", "empty_window", "identity"])
def test_patch_bit_identical_to_ksampler_when_neutral(sd15, hgr_dir, variant):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "blurry")
    hgr = load("identity.safetensors") if variant == "identity" else concept(clip, "a red cat")
    kw = {"strength0": dict(strength=0.0), "empty_window": dict(start=0.5, end=0.2), "identity": {}}[variant]
    ref = ksample(model, pos, neg)
    out = ksample(safe_patch(model, hgr, **kw), pos, neg)
    assert torch.equal(ref, out)


def test_redirection_changes_harmful_output(sd15, hgr_dir):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "blurry")
    ref = ksample(model, pos, neg)
    assert not torch.equal(ref, ksample(safe_patch(model, concept(clip, "a red cat")), pos, neg))
    assert not torch.equal(ref, ksample(safe_patch(model, load("random.safetensors")), pos, neg))
    g_out = sample_guider(safe_guider(model, pos, neg, load("random.safetensors")), model, latent())
    assert torch.isfinite(g_out).all()


class Recorder:
    """A post-CFG hook that, at every step, recomputes g and the concept direction h at the same x and
    sigma in a separate model call, and records them with the direction the sampler actually used."""

    def __init__(self, pos, neg, concept_cond):
        self.conds = [comfy.sampler_helpers.convert_cond(c) for c in (pos, neg, concept_cond)]
        self.steps = []

    def __call__(self, args):
        model, x, sigma = args["model"], args["input"], args["sigma"]
        enc = [comfy.samplers.encode_model_conds(model.extra_conds, c, x, x.device, "positive") for c in self.conds]
        d_pos, d_neg, d_c = comfy.samplers.calc_cond_batch(model, enc, x, sigma, {})
        self.steps.append(dict(g=d_pos - d_neg, h=d_c - d_neg, used=args["cond_denoised"] - args["uncond_denoised"]))
        return args["denoised"]

    def install(self, model):
        """Register on ``model`` through a closure: ModelPatcher.clone() deep-copies callable objects."""
        model.set_model_sampler_post_cfg_function(lambda args: self(args))
        return model


def _proj(g, h):
    gf, hf = g.flatten(1), h.flatten(1)
    return ((gf * hf).sum(1) / (hf * hf).sum(1)).view(-1, 1, 1, 1) * h


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_concept_patch_removes_stated_share_end_to_end(sd15, strength):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat on grass"), encode(clip, "")
    concept_cond = encode(clip, "a red cat")
    patched = safe_patch(model, concept(clip, "a red cat"), strength=strength)
    rec = Recorder(pos, neg, concept_cond)
    rec.install(patched)
    ksample(patched, pos, neg)
    assert len(rec.steps) == STEPS
    for st in rec.steps:
        g, h, used = st["g"], st["h"], st["used"]
        par = _proj(g, h)
        expected = g - strength * par
        torch.testing.assert_close(used, expected, rtol=1e-3, atol=1e-4)
        # the component orthogonal to the concept direction is unchanged
        torch.testing.assert_close(used - _proj(used, h), g - par, rtol=1e-3, atol=1e-4)


def test_concept_equal_to_prompt_scales_guidance_in_guider(sd15):
    """With the concept text equal to the prompt, h == g: strength s leaves (1 - s) of the guidance."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a knife"), encode(clip, "")
    s = 0.75
    rec = Recorder(pos, neg, pos)
    m = model.clone()
    rec.install(m)
    sample_guider(safe_guider(m, pos, neg, concept(clip, "a knife"), strength=s), m, latent())
    assert len(rec.steps) == STEPS
    for st in rec.steps:
        torch.testing.assert_close(st["used"], (1 - s) * st["g"], rtol=1e-3, atol=1e-4)


def test_concept_conds_share_the_batched_model_call(sd15):
    """Positive, negative and every concept go through the UNet in one call per step."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    for make in ("guider", "patch"):
        calls = []

        def count_rows(apply_model, a, calls=calls):
            calls.append(a["input"].shape[0])
            return apply_model(a["input"], a["timestep"], **a["c"])

        m = model.clone()
        m.set_model_unet_function_wrapper(count_rows)
        h = concept(clip, "a red cat\nblood\nknife")
        if make == "guider":
            sample_guider(safe_guider(m, pos, neg, h), m, latent())
        else:
            ksample(safe_patch(m, h), pos, neg)
        assert calls == [5] * STEPS, (make, calls)


@pytest.mark.parametrize("make", ["guider", "patch"])
def test_cfg_one(sd15, make):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a knife"), encode(clip, "")
    h = concept(clip, "a knife")
    if make == "guider":
        ref = sample_guider(core_guider(model, pos, neg, 1.0), model, latent())
        same = sample_guider(safe_guider(model, pos, neg, h, cfg=1.0, strength=0.0), model, latent())
        red = sample_guider(safe_guider(model, pos, neg, h, cfg=1.0), model, latent())
    else:
        ref = ksample(model, pos, neg, cfg=1.0)
        same = ksample(safe_patch(model, h, strength=0.0), pos, neg, cfg=1.0)
        red = ksample(safe_patch(model, h), pos, neg, cfg=1.0)
    assert torch.equal(ref, same)
    assert torch.isfinite(red).all() and not torch.allclose(ref, red, atol=1e-3)
    # at cfg 1 with the concept equal to the prompt, full strength removes all guidance: D = D_u
    uncond_only = sample_guider(core_guider(model, neg, neg, 1.0), model, latent())
    torch.testing.assert_close(red, uncond_only, rtol=1e-3, atol=1e-3)


def test_batch_of_three_prompts_redirected_one_by_one(sd15):
    model, clip, _ = sd15
    texts = ["a green tree in a field", "a knife", "a blue house by the sea"]
    encs = [encode(clip, t) for t in texts]
    pos = [[torch.cat([e[0][0] for e in encs]), {"pooled_output": torch.cat([e[0][1]["pooled_output"] for e in encs])}]]
    neg = encode(clip, "")
    red = concept(clip, "a knife", threshold=0.95)
    m = model.clone()
    rec = Recorder(pos, neg, encode(clip, "a knife"))
    rec.install(m)
    out = ksample(safe_patch(m, red), pos, neg, lat=latent(batch=3))
    plain = ksample(model, pos, neg, lat=latent(batch=3))
    assert len(rec.steps) == STEPS
    touched = torch.zeros(3, dtype=torch.bool)
    for st in rec.steps:
        g, h, used = st["g"], st["h"], st["used"]
        cos = torch.nn.functional.cosine_similarity(g.flatten(1), h.flatten(1), dim=1)
        assert cos[1] > 0.999  # the knife sample's guidance is the concept direction: removed entirely
        torch.testing.assert_close(used[1], torch.zeros_like(used[1]), atol=1e-4, rtol=0)
        for i in (0, 2):  # the others are judged on their own cosine
            if cos[i] < 0.95:
                torch.testing.assert_close(used[i], g[i], rtol=1e-4, atol=1e-5)
            else:
                touched[i] = True
    assert not torch.allclose(out[1], plain[1])
    for i in (0, 2):
        if not touched[i]:
            torch.testing.assert_close(out[i], plain[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["area", "mask"])
def test_area_and_mask_conditionings(sd15, hgr_dir, kind):
    model, clip, _ = sd15
    base, neg = encode(clip, "a red cat"), encode(clip, "")
    if kind == "area":
        (pos,) = node_out("ConditioningSetArea", conditioning=base, width=32, height=32, x=0, y=0, strength=1.0)
    else:
        mask = torch.zeros(1, 64, 64)
        mask[:, :32] = 1.0
        (pos,) = node_out("ConditioningSetMask", conditioning=base, mask=mask, strength=1.0, set_cond_area="default")
    (pos,) = node_out("ConditioningCombine", conditioning_1=pos, conditioning_2=encode(clip, "a garden"))
    ref = ksample(model, pos, neg)
    assert torch.equal(ref, ksample(safe_patch(model, load("identity.safetensors")), pos, neg))
    ref_g = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    ident = safe_guider(model, pos, neg, load("identity.safetensors"))
    assert torch.equal(ref_g, sample_guider(ident, model, latent()))
    red = ksample(safe_patch(model, concept(clip, "a red cat")), pos, neg)
    assert torch.isfinite(red).all() and not torch.equal(red, ref)
    red_g = sample_guider(safe_guider(model, pos, neg, concept(clip, "a red cat")), model, latent())
    assert torch.isfinite(red_g).all() and not torch.equal(red_g, ref_g)


def test_sdxl_family(sdxl):
    model, clip, _ = sdxl
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    h = concept(clip, "a red cat")
    ref = ksample(model, pos, neg)
    assert torch.equal(ref, ksample(safe_patch(model, h, strength=0.0), pos, neg))
    red = ksample(safe_patch(model, h), pos, neg)
    assert torch.isfinite(red).all() and not torch.equal(red, ref)
    ref_g = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    assert torch.equal(ref_g, sample_guider(safe_guider(model, pos, neg, h, strength=0.0), model, latent()))
    red_g = sample_guider(safe_guider(model, pos, neg, h), model, latent())
    assert torch.isfinite(red_g).all() and not torch.equal(red_g, ref_g)


def test_sdxl_learned_hgr_family_check(sdxl, sd15, hgr_dir):
    with pytest.raises(ValueError) as e:
        safe_patch(sdxl.model, load("random.safetensors"))
    msg = str(e.value)
    assert "HGRSafeCFGPatch" in msg and "random.safetensors" in msg and "SD15" in msg and "SDXL" in msg
    with pytest.raises(ValueError) as e:
        safe_guider(sd15.model, encode(sd15.clip, "x"), encode(sd15.clip, ""), load("random_sdxl.safetensors"))
    assert "HGRSafeCFGGuider" in str(e.value) and "train" in str(e.value)
    patched = safe_patch(sdxl.model, load("random_sdxl.safetensors"))
    out = ksample(patched, encode(sdxl.clip, "x"), encode(sdxl.clip, ""))
    assert torch.isfinite(out).all()


def test_stacks_with_rescale_cfg_and_pre_cfg_nodes(sd15, hgr_dir):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    (rescaled,) = node_out("RescaleCFG", model=model, multiplier=0.7)
    (apg,) = node_out("APG", model=model, eta=0.5, norm_threshold=2.0, momentum=0.0)
    for other in (rescaled, apg):
        ref = ksample(other, pos, neg)
        assert torch.equal(ref, ksample(safe_patch(other, load("identity.safetensors")), pos, neg))
        red = ksample(safe_patch(other, concept(clip, "a red cat")), pos, neg)
        assert not torch.equal(red, ref)
    # the post-CFG rescale still acts on the redirected result, in the patch and in the guider
    h = concept(clip, "a red cat", threshold=0.5)
    plain_red = ksample(safe_patch(model, h, strength=0.5), pos, neg)
    resc_red = ksample(safe_patch(rescaled, h, strength=0.5), pos, neg)
    assert not torch.equal(plain_red, resc_red)
    g_plain = sample_guider(safe_guider(model, pos, neg, h, strength=0.5), model, latent())
    g_resc = sample_guider(safe_guider(rescaled, pos, neg, h, strength=0.5), rescaled, latent())
    assert not torch.equal(g_plain, g_resc)
    # two SafeCFG patches stack (learned + concept)
    both = ksample(safe_patch(safe_patch(model, load("random.safetensors")), h), pos, neg)
    assert torch.isfinite(both).all()


def test_loader_errors_name_node_file_and_fix(hgr_dir):
    bad = hgr_dir / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ValueError) as e:
        load("broken.safetensors")
    msg = str(e.value)
    assert msg.startswith("HGRLoader:") and "broken.safetensors" in msg and "truncated" in msg.lower()
    with pytest.raises(ValueError) as e:
        load("not_there.safetensors")
    assert "HGRLoader" in str(e.value) and "models/hgr" in str(e.value)


def test_concept_node_rejects_empty_text(sd15):
    with pytest.raises(ValueError, match="HGRConceptRedirector: 'concepts' is empty"):
        concept(sd15.clip, "  \n# only a comment\n")


def test_patch_under_the_safecfg_guider_evaluates_its_concepts_once(sd15, hgr_dir):
    """The guider makes its own batched call, so the patch's concepts are evaluated in the pre-CFG hook
    (a fallback); with two concepts that call must not be mistaken for a cond/uncond pair."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    patched = safe_patch(model, concept(clip, "a red cat\na blue dog", threshold=0.0), strength=0.8)
    ref = sample_guider(core_guider(patched, pos, neg, 5.0), patched, latent())
    out = sample_guider(safe_guider(patched, pos, neg, load("identity.safetensors")), patched, latent())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, sample_guider(core_guider(model, pos, neg, 5.0), model, latent()), atol=1e-3)


@pytest.mark.parametrize("make", ["guider", "patch"])
def test_push_memory_is_per_run(sd15, make):
    """The concept redirector's push evidence lives in the run: the sampler hands the redirector one
    state dict for all steps of a run and a fresh one for the next run, so a second identical run
    gives the same image."""
    model, clip, _ = sd15
    texts = ["a knife on a table", "a blue house by the sea"]
    encs = [encode(clip, t) for t in texts]
    pos = [[torch.cat([e[0][0] for e in encs]), {"pooled_output": torch.cat([e[0][1]["pooled_output"] for e in encs])}]]
    neg = encode(clip, "")
    red, states = pushing_concepts_with_state_spy(clip)
    if make == "guider":
        g = safe_guider(model, pos, neg, red)
        first, again = sample_guider(g, model, latent(batch=2)), sample_guider(g, model, latent(batch=2))
    else:
        m = safe_patch(model, red)
        first, again = ksample(m, pos, neg, lat=latent(batch=2)), ksample(m, pos, neg, lat=latent(batch=2))
    assert len(states) == 2 * STEPS
    run1, run2 = states[:STEPS], states[STEPS:]
    assert all(isinstance(s, dict) and s is run1[0] for s in run1)
    assert all(s is run2[0] for s in run2) and run2[0] is not run1[0]
    assert run1[0]["concept_evidence"]["batch"] == 2 and len(run1[0]["concept_evidence"]["cos"]) == 2
    assert torch.equal(first, again)


def test_concept_node_schema_lists_every_setting():
    """Every argument of the concept node's execute is an input the front end can set."""
    import inspect

    cls = runtime.get_node("HGRConceptRedirector")
    ids = {i.id for i in cls.GET_SCHEMA().inputs}
    params = set(inspect.signature(cls.execute).parameters) - {"cls"}
    assert params == ids, (params, ids)


def test_concept_node_defaults_match_the_front_end(sd15):
    """A graph that leaves out the optional inputs gets what the front end shows as their defaults."""
    cls = runtime.get_node("HGRConceptRedirector")
    defaults = {i.id: i.default for i in cls.GET_SCHEMA().inputs if getattr(i, "optional", False)}
    (h,) = node_out("HGRConceptRedirector", clip=sd15.clip, concepts="a knife", threshold=0.2, push=1.0,
                    mode="global")
    assert h.redirector.push_tau == defaults["push_threshold"] and h.redirector.memory == defaults["push_memory"]
    # the text stage: on by default for a line with '->' (at the front end's default match), none without
    assert h.redirector.text_stage is None
    (r,) = node_out("HGRConceptRedirector", clip=sd15.clip, concepts="a knife -> a spoon", threshold=0.2, push=1.0,
                    mode="global")
    assert r.redirector.text_stage is not None and r.redirector.text_stage.start == defaults["text_match"] < 1.0


def test_concept_replacement_syntax_adds_one_row_per_safe_concept_and_steers(sd15):
    """'harmful words -> safe words': each distinct safe concept is one more row of the batched call;
    the guider and the patch give the same image, which differs from erasing alone."""
    model, clip, _ = sd15
    text = "weapon: a knife, a dagger -> a spoon\ngore: a skull -> a spoon\nhate: a slur"
    (h,) = node_out("HGRConceptRedirector", clip=clip, concepts=text, threshold=-1.0, push=0.0, mode="global")
    red = h.redirector
    assert (red.num_harmful, red.num_safe, red.num_concepts, red.targets) == (3, 1, 4, [0, 0, None])
    assert len(h.concept_conds) == 4 and h.categories == ["weapon", "gore", "hate"]
    assert torch.equal(h.concept_conds[3][0][0], encode(clip, "a spoon")[0][0])
    (erase,) = node_out("HGRConceptRedirector", clip=clip, concepts="weapon: a knife, a dagger\ngore: a skull\n"
                        "hate: a slur", threshold=-1.0, push=0.0, mode="global")
    pos, neg = encode(clip, "a knife on a table"), encode(clip, "")
    via_guider = sample_guider(safe_guider(model, pos, neg, h), model, latent())
    via_patch = ksample(safe_patch(model, h), pos, neg)
    torch.testing.assert_close(via_guider, via_patch, rtol=1e-4, atol=1e-4)
    erased = sample_guider(safe_guider(model, pos, neg, erase), model, latent())
    assert not torch.allclose(via_guider, erased, atol=1e-3)
    for bad in ("weapon: a knife ->", "-> a spoon"):
        with pytest.raises(ValueError, match="HGRConceptRedirector: concept line .* empty side of '->'"):
            node_out("HGRConceptRedirector", clip=clip, concepts=bad, threshold=0.2, push=0.0, mode="global")
