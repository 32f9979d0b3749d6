"""The guider, the KSampler patch and the concept redirector on the flow-matching transformer families
ComfyUI ships (SD3, Flux, Chroma, Qwen-Image, Lumina 2, Z-Image, HiDream, Wan 2.1 video), each a tiny
seeded model of the real ComfyUI architecture (``devtools.tiny_nodes.models.tiny_dit``), conditioned by
seeded tensors with the family's extras (pooled vectors, Flux's guidance, HiDream's Llama layers)."""

from __future__ import annotations

import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import nodes
import pytest
import torch

from devtools.tiny_nodes import models as tiny
from safecfg_pack.nodes import sampling
from safecfg_pack.nodes.hgr_type import HGRHandle
from safecfg_pack.safecfg.redirect import ConceptRedirector, concept_redirect

FAMILIES = tiny.dit_families()  # those the running ComfyUI has: all 8 on 0.3.75 (tested below)
#: the families whose tiny text encoder and VAE this ComfyUI can build too (0.3.52 has no Z-Image encoder
#: and no TAEHV: Lumina 2, Qwen-Image and Wan lack a stand-in there)
BUILT = [f for f in tiny.tiny_families() if f in FAMILIES]
STEPS = 3


def _has(*families):
    return [f for f in families if f in FAMILIES]


def model_for(family):
    return tiny.tiny_dit(family, seed=0)


def conds(family, n=1):
    """positive, negative and a concept conditioning for ``family``."""
    return (tiny.dit_conditioning(family, 1, n), tiny.dit_conditioning(family, 2, n),
            tiny.dit_conditioning(family, 3, 1))


def concept_handle(concept_cond, tau=-1.0, patch=0, num=1, safe_cond=None):
    red = ConceptRedirector(num, tau=tau, patch=patch, targets=None if safe_cond is None else [0],
                            num_safe=0 if safe_cond is None else 1)
    rows = [concept_cond] * num + ([safe_cond] if safe_cond is not None else [])
    return HGRHandle(red, name="concepts", concept_conds=rows)


def sigmas(model):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)


def run_guider(guider, model, shape, seed=0):
    lat = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(lat, seed)
    return guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas(model), disable_pbar=True,
                         seed=seed)


def core(model, pos, neg, shape, cfg=5.0):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return run_guider(g, model, shape)


def safe(model, handle, pos, neg, shape, cfg=5.0, strength=1.0, start=0.0, end=1.0):
    g = sampling.SafeCFGGuider(model, handle, strength, start, end)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return run_guider(g, model, shape)


def ksample(model, pos, neg, shape, cfg=5.0, seed=0):
    return nodes.common_ksampler(model, seed, STEPS, cfg, "euler", "simple", pos, neg,
                                 {"samples": torch.zeros(shape)})[0]["samples"]


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def weapon_concept(clip, **kw):
    """The concept redirector node with one replacement line, through ``clip``."""
    from safecfg_pack.nodes import hgr_nodes

    (h,) = hgr_nodes.HGRConceptRedirector.execute(clip=clip, concepts="weapon: knife, dagger -> spoon", push=0.0,
                                                  mode="global", **kw).result
    return h


def four_pairs():
    """A prompt-pair file's content for short training runs: two categories, two pairs each, four clean."""
    from safecfg_pack.safecfg import train

    return train.PromptData(harmful=["a red knife", "a blue knife", "a skull", "a green skull"],
                            safe=["a red spoon", "a blue spoon", "a ball", "a green ball"],
                            categories=["weapon", "weapon", "gore", "gore"],
                            clean=["a red cat", "a blue house", "a tree", "a green field"])


class Recorder:
    """A post-CFG hook that recomputes, in a separate model call at the same x and sigma, the guidance
    ``g`` and the concept direction ``h`` (each conditioning with its own extras), beside the direction
    the sampler used."""

    def __init__(self, *conditionings):
        self.conds = [comfy.sampler_helpers.convert_cond(c) for c in conditionings]
        self.steps = []

    def install(self, model):
        model.set_model_sampler_post_cfg_function(lambda args: self(args))
        return model

    def __call__(self, args):
        model, x, sigma = args["model"], args["input"], args["sigma"]
        enc = [comfy.samplers.encode_model_conds(model.extra_conds, c, x, x.device, "positive") for c in self.conds]
        d = comfy.samplers.calc_cond_batch(model, enc, x, sigma, {})
        self.steps.append(dict(g=d[0] - d[1], dirs=[o - d[1] for o in d[2:]],
                               used=args["cond_denoised"] - args["uncond_denoised"]))
        return args["denoised"]


def count_rows(model):
    calls = []

    def wrapper(apply_model, a):
        calls.append(a["input"].shape[0])
        return apply_model(a["input"], a["timestep"], **a["c"])

    model.set_model_unet_function_wrapper(wrapper)
    return calls


# ------------------------------------------------------------------------------------------------


def test_every_family_on_0_3_75():
    """The ComfyUI that `make test` runs (0.3.75, or newer) has every family of the table: none of the
    tests below is left out there; an older ComfyUI of the declared range lacks only Z-Image."""
    import comfyui_version

    version = tuple(int(x) for x in comfyui_version.__version__.split(".")[:3])
    missing = sorted(set(tiny.DIT_FAMILIES) - set(FAMILIES))
    if version >= (0, 3, 75):
        assert missing == []
    else:
        assert set(missing) <= {"z_image"}, missing


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_the_real_architecture_and_prompt_sensitive(family):
    m = model_for(family)
    spec = tiny.DIT_FAMILIES[family]
    assert type(m.model).__name__ == {"WAN21_T2V": "WAN21", "ZImage": "Lumina2"}.get(spec["cls"], spec["cls"])
    pos, neg, _ = conds(family)
    shape = tiny.dit_latent_shape(family)
    a, b = core(m, pos, neg, shape), core(m, neg, neg, shape)
    assert a.shape == shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # the prompt matters


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_settings_are_bit_identical_to_core(family):
    """Strength 0 and an empty window: the guider equals core CFGGuider and the patch equals KSampler,
    bit for bit, with a concept row in the handle."""
    m = model_for(family)
    pos, neg, c = conds(family)
    shape = tiny.dit_latent_shape(family)
    h = concept_handle(c)
    ref = core(m, pos, neg, shape)
    assert torch.equal(safe(m, h, pos, neg, shape, strength=0.0), ref)
    assert torch.equal(safe(m, h, pos, neg, shape, start=0.6, end=0.6), ref)
    ref_k = ksample(m, pos, neg, shape)
    assert torch.equal(ksample(sampling.patch_model(m, h, 0.0, 0.0, 1.0), pos, neg, shape), ref_k)
    assert torch.equal(ksample(sampling.patch_model(m, h, 1.0, 0.5, 0.2), pos, neg, shape), ref_k)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make", ["guider", "patch"])
def test_concept_share_removed_end_to_end_with_the_family_extras(family, make):
    """Strength s removes s of the guidance's component along the concept direction, at every step,
    for a batch of two prompts, with the concept's row in the same batched model call; the recorder
    evaluates every conditioning with its own extras, so extras lost or mixed in the batched call
    would show as a mismatch."""
    m = model_for(family)
    # two prompts in one conditioning; Lumina 2 and Z-Image conditionings carry their token mask and one
    # prompt each (ComfyUI 0.3.52 sums a batched mask into one token count), batched by the latent
    masked = family in ("lumina2", "z_image")
    pos, neg, c = conds(family, n=1 if masked else 2)
    shape = tiny.dit_latent_shape(family, batch=2)
    s = 0.6
    rec = Recorder(pos, neg, c)
    m2 = rec.install(m.clone())
    rows = count_rows(m2)
    h = concept_handle(c)
    if make == "guider":
        out = safe(m2, h, pos, neg, shape, strength=s)
    else:
        out = ksample(sampling.patch_model(m2, h, s, 0.0, 1.0), pos, neg, shape)
    assert torch.isfinite(out).all() and out.shape == shape
    assert len(rec.steps) == STEPS
    # 2 samples x (positive, negative, concept) rows a step, in one calc_cond_batch (which ComfyUI may
    # split into several model calls where the conds cannot be concatenated, e.g. with token masks); the
    # recorder's own call runs without the sampler's model options, so it is not counted
    assert sum(rows) == 6 * STEPS, rows
    for st in rec.steps:
        g, hdir, used = st["g"], st["dirs"][0], st["used"]
        expected = g + s * (concept_redirect(g, [hdir], tau=-1.0) - g)
        torch.testing.assert_close(used, expected, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(used, g, rtol=1e-3, atol=1e-4)  # it did act


@pytest.mark.parametrize("family", _has("flux", "qwen_image", "wan21"))
def test_patch_mode_on_16_channel_and_video_latents(family):
    """``patch`` mode (4x4 latent regions; per latent frame on 5-D video latents) end to end, with a
    replacement concept (``a -> b``): the direction used is the per-region redirection of ``g``."""
    m = model_for(family)
    pos, neg, c = conds(family)
    safe_c = tiny.dit_conditioning(family, 4, 1)
    shape = tiny.dit_latent_shape(family, size=16)
    rec = Recorder(pos, neg, c, safe_c)
    m2 = rec.install(m.clone())
    h = concept_handle(c, tau=0.0, patch=4, safe_cond=safe_c)
    out = ksample(sampling.patch_model(m2, h, 1.0, 0.0, 1.0), pos, neg, shape)
    assert torch.isfinite(out).all()
    acted = False
    for st in rec.steps:
        g, (hdir, sdir), used = st["g"], st["dirs"], st["used"]
        expected = concept_redirect(g, [hdir], tau=0.0, patch=4, replacements=[sdir])
        torch.testing.assert_close(used, expected, rtol=1e-3, atol=1e-4)
        glob = concept_redirect(g, [hdir], tau=0.0, patch=0, replacements=[sdir])
        acted = acted or not torch.allclose(used, g, atol=1e-4)
        assert not torch.allclose(expected, glob, atol=1e-4)  # regions, not one decision per image
    assert acted


def test_video_patch_mode_redirects_only_the_frames_where_the_concept_forms():
    """On a 5-D latent, a concept aligned with the guidance in one frame's region is removed there and
    nowhere else (regions are per latent frame)."""
    torch.manual_seed(0)
    g = torch.randn(1, 16, 3, 8, 8)
    h = torch.randn(1, 16, 3, 8, 8)
    h[:, :, 1, :4, :4] = g[:, :, 1, :4, :4]  # frame 1, top-left region: h == g
    out = concept_redirect(g, [h], tau=0.9, ramp=0.05, patch=4)
    changed = (out - g).abs().amax(dim=1)[0] > 1e-6  # (T, H, W)
    assert changed[1, :4, :4].all()
    changed[1, :4, :4] = False
    assert not changed.any()
    torch.testing.assert_close(out[:, :, 1, :4, :4], torch.zeros_like(out[:, :, 1, :4, :4]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", _has("flux", "z_image", "wan21"))
@pytest.mark.parametrize("make", ["guider", "patch"])
def test_cfg_one_on_a_distilled_model_evaluates_the_negative(family, make):
    """At cfg 1 ComfyUI evaluates no negative. With strength > 0 SafeCFG evaluates it (one more model
    row, plus the concept's) and redirects; at strength 0 it is core's cfg-1 sampling, bit for bit."""
    m = model_for(family)
    pos, neg, c = conds(family)
    shape = tiny.dit_latent_shape(family)
    h = concept_handle(c)
    ref_m = m.clone()
    ref_rows = count_rows(ref_m)
    ref = core(ref_m, pos, neg, shape, cfg=1.0) if make == "guider" else ksample(ref_m, pos, neg, shape, cfg=1.0)
    assert ref_rows == [1] * STEPS  # core skips the negative at cfg 1
    m2 = m.clone()
    rows = count_rows(m2)
    if make == "guider":
        same = safe(m, h, pos, neg, shape, cfg=1.0, strength=0.0)
        red = safe(m2, h, pos, neg, shape, cfg=1.0, strength=1.0)
    else:
        same = ksample(sampling.patch_model(m, h, 0.0, 0.0, 1.0), pos, neg, shape, cfg=1.0)
        red = ksample(sampling.patch_model(m2, h, 1.0, 0.0, 1.0), pos, neg, shape, cfg=1.0)
    assert torch.equal(same, ref)
    assert rows == [3] * STEPS, rows  # positive, negative, concept
    assert torch.isfinite(red).all() and not torch.allclose(red, ref, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_width_is_read_from_every_family_s_config(family):
    from safecfg_pack.nodes.hgr_type import model_family, model_text_width

    m = model_for(family)
    assert model_text_width(m) == tiny.DIT_FAMILIES[family]["text_dim"]
    assert model_family(m) == tiny.DIT_FAMILIES[family]["cls"]


def test_learned_hgrs_for_another_family_are_refused_naming_both():
    """A text HGR of the right width but another family (the same width is no proof of the same
    encoder), a text HGR of another width and a 4-channel latent HGR are refused on a tiny Flux by the
    patch node, each with a message naming what the file and the model are and the fix."""
    from safecfg_pack.nodes import guidance_nodes, hgr_type
    from safecfg_pack.safecfg import hgr_net
    from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet

    m = model_for("flux")
    width = tiny.DIT_FAMILIES["flux"]["text_dim"]

    def text_handle(w, family):
        cfg = TextHGRConfig(embed_dim=w, tokens=8, width=16, layers=1, heads=2)
        return hgr_type.handle_for(TextHGR(TextHGRNet(cfg, torch.zeros(8, w)), family=family), f"{family}.safetensors")

    def patch(h):
        return guidance_nodes.HGRSafeCFGPatch.execute(model=m, hgr=h, strength=1.0, start_percent=0.0,
                                                      end_percent=1.0)

    with pytest.raises(ValueError, match=r"HGRSafeCFGPatch: text HGR 'WAN21_T2V.safetensors' was trained for "
                                         r"WAN21_T2V text embeddings but the model connected is Flux\."):
        patch(text_handle(width, "WAN21_T2V"))
    with pytest.raises(ValueError, match=rf"reads {width * 2}-wide text embeddings .* is {width} wide \(Flux\)"):
        patch(text_handle(width * 2, "Flux"))
    latent = hgr_type.handle_for(hgr_net.LearnedHGR(hgr_net.HGRNet(hgr_net.HGRConfig(width=16, mults=[1, 2],
                                                                                    embed_dim=16)),
                                                    latent_format="SD15"), "sd15_latent.safetensors")
    with pytest.raises(ValueError, match=r"works on 4-channel latents but the model has 16-channel latents"):
        patch(latent)
    assert patch(text_handle(width, "Flux")) is not None  # its own family passes the check


def test_a_text_hgr_applies_to_variants_that_read_the_same_encoder():
    """A text HGR trained for Flux applies to a Flux Schnell model (ComfyUI's FluxSchnell config: the same
    T5 + CLIP-L), one for Wan 2.1 to Wan 2.2 (the same umt5); Z-Image's config derives from Lumina 2's
    but its encoder (Qwen3) is not Lumina 2's (Gemma 2), so a Lumina 2 text HGR is refused there."""
    import comfy.supported_models

    from safecfg_pack.nodes import guidance_nodes, hgr_type
    from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet

    assert issubclass(comfy.supported_models.FluxSchnell, comfy.supported_models.Flux)
    spec = tiny.DIT_FAMILIES["flux"]
    schnell_cfg = comfy.supported_models.FluxSchnell(dict(spec["unet"], guidance_embed=False))
    schnell_cfg.set_inference_dtype(torch.float32, None)
    schnell = tiny._patcher(schnell_cfg.get_model({}))
    assert hgr_type.model_family(schnell) == "FluxSchnell"
    assert hgr_type.text_family("FluxSchnell") == "Flux" and hgr_type.text_family("WAN22_T2V") == "WAN21_T2V"
    assert hgr_type.text_family("ZImage") == "ZImage" and hgr_type.text_family("Flux2") == "Flux2"

    def handle(family, w):
        cfg = TextHGRConfig(embed_dim=w, tokens=8, width=16, layers=1, heads=2, layout=1)
        return hgr_type.handle_for(TextHGR(TextHGRNet(cfg, torch.zeros(8, w)), family=family), f"{family}.safetensors")

    def patch(m, h):
        return guidance_nodes.HGRSafeCFGPatch.execute(model=m, hgr=h, strength=1.0, start_percent=0.0,
                                                      end_percent=1.0)

    assert patch(schnell, handle("Flux", spec["text_dim"])) is not None
    with pytest.raises(ValueError, match=r"trained for SD3 text embeddings but the model connected is FluxSchnell"):
        patch(schnell, handle("SD3", spec["text_dim"]))
    if "z_image" in tiny.dit_families():
        with pytest.raises(ValueError, match=r"trained for Lumina2 text embeddings but the model connected is ZImage"):
            patch(model_for("z_image"), handle("Lumina2", tiny.DIT_FAMILIES["z_image"]["text_dim"]))


def test_concept_node_on_flux_with_its_own_text_encoders():
    """The concept redirector node on a tiny Flux with ComfyUI's own Flux text encoders (T5 sequence of
    256 tokens, CLIP-L pooled vector): a replacement line adds its safe row; the text stage rewrites the
    positive's T5 embedding and the patch samples as KSampler does on that rewritten positive (latent
    stage off); strength 0 is KSampler bit for bit; both stages together run and act."""
    m, clip = model_for("flux"), tiny.tiny_flux_clip(0)
    pos, neg = encode(clip, "a red knife on a table"), encode(clip, "")
    assert pos[0][0].shape == (1, 256, tiny.DIT_FAMILIES["flux"]["text_dim"])
    shape = tiny.dit_latent_shape("flux")
    both = weapon_concept(clip, threshold=0.2)
    assert len(both.concept_rows()) == 2  # the harmful line and its safe phrase
    text_only = weapon_concept(clip, threshold=1.0, text_match=0.0)
    assert text_only.concept_rows() == []
    rw = text_only.redirector.rewrite(pos[0][0], 1.0)
    assert not torch.equal(rw, pos[0][0])
    want = ksample(m, [[rw, dict(pos[0][1])]], neg, shape, cfg=3.5)
    got = ksample(sampling.patch_model(m, text_only, 1.0, 0.0, 1.0), pos, neg, shape, cfg=3.5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    ref = ksample(m, pos, neg, shape, cfg=3.5)
    assert torch.equal(ksample(sampling.patch_model(m, both, 0.0, 0.0, 1.0), pos, neg, shape, cfg=3.5), ref)
    out = ksample(sampling.patch_model(m, both, 1.0, 0.0, 1.0), pos, neg, shape, cfg=3.5)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)


def test_latent_hgr_trains_on_flux_and_drives_it(tmp_path):
    """The learned latent HGR for a 16-channel family: teacher cache from a tiny Flux's own trajectories
    (its own T5 + CLIP-L prompts), a short fit, a file that records 16 channels and the Flux latent
    family, loaded and applied by the patch on Flux, refused on SD3 (16 channels too, another family)."""
    from safecfg_pack.nodes import guidance_nodes, hgr_type
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg import hgr_file, hgr_net, train

    data = four_pairs()
    m, clip = model_for("flux"), tiny.tiny_flux_clip(0)
    teacher = ComfyTeacher(m, clip, width=128, height=128)
    assert (teacher.latent_format, teacher.latent_channels) == ("Flux", 16)
    train.build_cache(teacher, data, tmp_path / "cache", train.CacheSpec(states_per_trajectory=2, noised_per_image=1,
                                                                         steps=4, batch=4, seed=1))
    cache = train.load_cache(tmp_path / "cache")
    assert cache["g"].shape == (24, 16, 16, 16)
    hgr, summary = train.fit(cache, hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16, latent_channels=16),
                             train.FitSpec(steps=20, batch=8, eval_every=10, lr=3e-3),
                             latent_format=teacher.latent_format, categories=data.category_names)
    hgr_file.save_hgr(tmp_path / "flux_hgr.safetensors", hgr, training=summary)
    back = hgr_file.load_hgr(tmp_path / "flux_hgr.safetensors", latent_format="Flux", latent_channels=16)
    h = hgr_type.handle_for(back, "flux_hgr.safetensors")
    pos, neg, _ = conds("flux")
    shape = tiny.dit_latent_shape("flux")
    (patched,) = guidance_nodes.HGRSafeCFGPatch.execute(model=m, hgr=h, strength=1.0, start_percent=0.0,
                                                        end_percent=1.0).result
    out, ref = ksample(patched, pos, neg, shape), ksample(m, pos, neg, shape)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"trained for the Flux latent family but the model is SD3"):
        guidance_nodes.HGRSafeCFGPatch.execute(model=model_for("sd3"), hgr=h, strength=1.0, start_percent=0.0,
                                               end_percent=1.0)


def test_latent_hgr_on_video_latents_acts_frame_by_frame():
    """A 16-channel latent HGR on Wan's 5-D latents: each latent frame redirected as an image (the same
    result as the frames sampled one by one), at that sample's sigma; end to end through the patch."""
    from safecfg_pack.nodes import hgr_type

    hgr = _random_latent_hgr("Wan21")
    g, u = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 16, 3, 8, 8)
    sigma = torch.tensor([0.7, 0.7])
    got = hgr.redirect(g, sigma, uncond=u).g_red
    for t in range(3):
        one = hgr.redirect(g[:, :, t].contiguous(), sigma, uncond=u[:, :, t].contiguous()).g_red
        torch.testing.assert_close(got[:, :, t], one, rtol=1e-5, atol=1e-6)
    m = model_for("wan21")
    pos, neg, _ = conds("wan21")
    shape = tiny.dit_latent_shape("wan21")
    h = hgr_type.handle_for(hgr, "wan_hgr.safetensors")
    out, ref = ksample(sampling.patch_model(m, h, 1.0, 0.0, 1.0), pos, neg, shape), ksample(m, pos, neg, shape)
    assert out.shape == shape and torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.skipif("z_image" not in FAMILIES, reason="this ComfyUI has no Z-Image (added after 0.3.52); "
                                                    "make test's 0.3.75 has it (test_every_family_on_0_3_75)")
def test_concept_node_on_z_image_at_cfg_one_with_its_own_text_encoder():
    """Z-Image as its distilled checkpoints are sampled (cfg 1), with ComfyUI's own Qwen3 tokenizer and
    encoder (tiny): prompts of different token counts and their attention masks; the concept node's
    rows are evaluated beside the negative that SafeCFG asks for; the text stage's rewritten positive
    gives what KSampler gives on it; strength 0 is core's cfg-1 sampling bit for bit."""
    m, clip = model_for("z_image"), tiny.tiny_z_image_clip(0)
    pos, neg = encode(clip, "a red knife on a table"), encode(clip, "")
    assert pos[0][0].shape[1] != neg[0][0].shape[1] and "attention_mask" in pos[0][1]
    shape = tiny.dit_latent_shape("z_image")
    ref = ksample(m, pos, neg, shape, cfg=1.0)
    both = weapon_concept(clip, threshold=0.2)
    assert torch.equal(ksample(sampling.patch_model(m, both, 0.0, 0.0, 1.0), pos, neg, shape, cfg=1.0), ref)
    m2 = m.clone()
    rows = count_rows(m2)
    out = ksample(sampling.patch_model(m2, both, 1.0, 0.0, 1.0), pos, neg, shape, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    assert sum(rows) == 4 * STEPS, rows  # positive, negative, harmful and safe concept rows, every step
    text_only = weapon_concept(clip, threshold=1.0, text_match=0.0)
    rw = text_only.redirector.rewrite(pos[0][0], 1.0)
    assert not torch.equal(rw, pos[0][0])
    want = ksample(m, [[rw, dict(pos[0][1])]], neg, shape, cfg=1.0)
    got = ksample(sampling.patch_model(m, text_only, 1.0, 0.0, 1.0), pos, neg, shape, cfg=1.0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_align_maps_a_chat_template_s_prefix_and_tail():
    """``align``: the shared prefix position by position, the tail right-aligned, the longer middle
    clipped to the first position after the prefix; equal lengths without a shared prefix: identity."""
    from safecfg_pack.safecfg.concept_text import align

    torch.manual_seed(0)
    ref = torch.randn(6, 4)  # prefix 3 tokens, then 3 tail tokens (an empty prompt in a template)
    x = torch.cat([ref[:3], torch.randn(4, 4), torch.randn(3, 4)])  # the same prefix, 4 words, a tail of 3
    assert align(10, ref, x).tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 4, 5]
    assert align(6, ref, torch.randn(6, 4)).tolist() == list(range(6))
    assert align(4, ref, torch.cat([ref[:2], torch.randn(2, 4)])).tolist() == [0, 1, 4, 5]


def _random_latent_hgr(latent_format: str):
    """A small 16-channel latent HGR whose output layer is not zero (so it acts), seeded."""
    from safecfg_pack.safecfg import hgr_net

    torch.manual_seed(0)
    net = hgr_net.HGRNet(hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16, latent_channels=16))
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return hgr_net.LearnedHGR(net, latent_format=latent_format)


def _random_text_hgr(empty, layout=1, seed=0, family="Flux"):
    """A text HGR of the sequence layout whose output layer is not zero (so it acts)."""
    from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet

    n, width = empty.shape
    cfg = TextHGRConfig(embed_dim=width, tokens=max(n, 64), width=16, layers=1, heads=2, layout=layout,
                        empty_tokens=n if n != max(n, 64) else 0)
    torch.manual_seed(seed)
    net = TextHGRNet(cfg, empty.float())
    torch.nn.init.normal_(net.out.weight, std=0.05)
    return TextHGR(net, family=family)


def test_text_hgr_trains_on_flux_and_drives_it(tmp_path):
    """The paper's HGR for a T5 family: trained on a tiny Flux with its own T5 + CLIP-L encoders (the
    sequence layout, 256 tokens), saved with its layout, loaded, and applied by the patch and by the
    guider exactly as core CFG with ``HGR(c)`` as the negative (the pooled vector the negative's own);
    refused on SD3 (another family)."""
    from safecfg_pack.nodes import guidance_nodes, hgr_type
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg import hgr_file
    from safecfg_pack.safecfg.text_train import TextFitSpec, TextStatesSpec, train_text_hgr

    data = four_pairs()
    m, clip = model_for("flux"), tiny.tiny_flux_clip(0)
    teacher = ComfyTeacher(m, clip, width=128, height=128)
    assert teacher.layout() == 1
    out = tmp_path / "flux_text_hgr.safetensors"
    hgr, summary = train_text_hgr(teacher, data, tmp_path / "cache", out,
                                  spec=TextStatesSpec(states_per_trajectory=2, steps=4, cfg=3.5, batch=4, seed=1),
                                  fit_spec=TextFitSpec(steps=12, batch=4, eval_every=4, lr=3e-3, val_fraction=0.0),
                                  width=32,
                                  family="Flux", layout=teacher.layout())
    back = hgr_file.load_hgr(out)
    assert (back.config.layout, back.config.empty_length, back.family) == (1, 256, "Flux")
    # on the harmful prompts' teacher states the fitted HGR is nearer its targets than the identity
    from safetensors.torch import load_file

    from safecfg_pack.safecfg.text_hgr import TextHGRNet
    from safecfg_pack.safecfg.text_train import relative_loss

    st = load_file(str(tmp_path / "cache" / "text_states.safetensors"))
    idx = st["harmful"].nonzero().flatten()
    emb = st["embeddings"][st["prompt"][idx]]

    def loss(net):
        with torch.no_grad():
            pred = teacher.denoise_embedding(st["x"][idx], st["sigma"][idx], net(emb))
        return float(relative_loss(pred, st["target"][idx], st["scale"][idx]).mean())

    assert loss(back.net) < 0.9 * loss(TextHGRNet(back.config, back.net.empty))
    pos, neg = encode(clip, "a red knife on a table"), encode(clip, "")
    c = pos[0][0]
    u = back.uncond(c)
    assert u.shape == c.shape and not torch.equal(u, neg[0][0])
    shape = tiny.dit_latent_shape("flux")
    h = hgr_type.handle_for(back, out.name)
    (patched,) = guidance_nodes.HGRSafeCFGPatch.execute(model=m, hgr=h, strength=1.0, start_percent=0.0,
                                                        end_percent=1.0).result
    want = ksample(m, pos, [[u, dict(neg[0][1])]], shape, cfg=3.5)
    got = ksample(patched, pos, neg, shape, cfg=3.5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.allclose(got, ksample(m, pos, neg, shape, cfg=3.5), atol=1e-4)
    g = safe(m, h, pos, neg, shape, cfg=3.5)
    assert (g - core(m, pos, [[u, dict(neg[0][1])]], shape, cfg=3.5)).abs().max() <= 1e-5 * g.abs().max()
    with pytest.raises(ValueError, match=r"trained for Flux text embeddings but the model connected is SD3"):
        guidance_nodes.HGRSafeCFGPatch.execute(model=model_for("sd3"), hgr=h, strength=1.0, start_percent=0.0,
                                               end_percent=1.0)


@pytest.mark.skipif("z_image" not in FAMILIES, reason="this ComfyUI has no Z-Image (added after 0.3.52); "
                                                    "make test's 0.3.75 has it (test_every_family_on_0_3_75)")
def test_text_hgr_on_z_image_takes_the_prompt_s_length_and_mask():
    """The sequence layout on an encoder whose output length varies (Z-Image's Qwen3, a chat template):
    ``HGR(c)`` has the prompt's length, the empty embedding mapped onto its positions (the template's
    prefix kept position by position at strength 0), and the unconditional branch takes the positive's
    attention mask; the patch samples as core CFG with that negative."""
    from safecfg_pack.nodes import hgr_type
    from safecfg_pack.safecfg.concept_text import align

    m, clip = model_for("z_image"), tiny.tiny_z_image_clip(0)
    pos, neg = encode(clip, "a red knife on a table"), encode(clip, "")
    c, e = pos[0][0], neg[0][0]
    assert c.shape[1] > e.shape[1] and "attention_mask" in pos[0][1]
    hgr = _random_text_hgr(e[0], family="ZImage")
    at0 = hgr.uncond(c, 0.0)
    assert at0.shape == c.shape
    assert torch.equal(at0[0], e[0][align(c.shape[1], e[0], c[0])].to(at0.dtype))
    u = hgr.uncond(c)
    assert not torch.allclose(u, at0)
    h = hgr_type.handle_for(hgr, "z_text_hgr.safetensors")
    shape = tiny.dit_latent_shape("z_image")
    want = ksample(m, pos, [[u, {"attention_mask": pos[0][1]["attention_mask"]}]], shape, cfg=3.0)
    got = ksample(sampling.patch_model(m, h, 1.0, 0.0, 1.0), pos, neg, shape, cfg=3.0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    (neg_hgr,) = sampling.text_negative(h, pos, neg, 1.0)[:1]
    assert torch.equal(neg_hgr[1]["attention_mask"], pos[0][1]["attention_mask"])


@pytest.mark.skipif("z_image" not in FAMILIES, reason="this ComfyUI has no Z-Image (added after 0.3.52); "
                                                    "make test's 0.3.75 has it (test_every_family_on_0_3_75)")
def test_text_hgr_trains_on_z_image_prompts_of_different_lengths(tmp_path):
    """The paper's HGR on an encoder whose output length varies (Z-Image's Qwen3): the teacher samples
    and denoises prompts of different token counts group by group (a batch equals each prompt alone; its
    prediction from a prompt's embedding equals the one from the prompt), the fit reads each prompt at
    its own length, and the file (sequence layout, the empty prompt's own length) is nearer the targets
    than the identity. The rewriter, which needs one length for a prompt and its rewrite, is refused
    with the reason."""
    from safetensors.torch import load_file

    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg import hgr_file, train
    from safecfg_pack.safecfg.text_hgr import TextHGRNet
    from safecfg_pack.safecfg.text_train import (
        TextFitSpec,
        TextStatesSpec,
        add_rewriter,
        relative_loss,
        train_text_hgr,
    )

    data = train.PromptData(harmful=["a red knife", "a knife on a wooden table", "a skull", "a green skull"],
                            safe=["a red spoon", "a spoon on a wooden table", "a ball", "a green ball"],
                            categories=["weapon", "weapon", "gore", "gore"],
                            clean=["a red cat", "a blue house by the sea", "a tree", "a green field"])
    m, clip = model_for("z_image"), tiny.tiny_z_image_clip(0)
    teacher = ComfyTeacher(m, clip, width=128, height=128)
    prompts = ["a red knife", "a knife on a wooden table"]
    emb, lengths = teacher.embed_padded(prompts)
    assert lengths[0] != lengths[1] and len(teacher.length_groups(prompts)) == 2
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6, 0.6])
    (both,) = teacher.denoise(x, sigma, [prompts])
    for i, p in enumerate(prompts):
        (alone,) = teacher.denoise(x[i:i + 1], sigma[i:i + 1], [[p]])
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-5)
        from_emb = teacher.denoise_embedding(x[i:i + 1], sigma[i:i + 1], emb[i:i + 1, :int(lengths[i])])
        torch.testing.assert_close(from_emb.cpu(), alone, rtol=1e-4, atol=1e-5)
    out = tmp_path / "z_text_hgr.safetensors"
    hgr, _ = train_text_hgr(teacher, data, tmp_path / "cache", out,
                            spec=TextStatesSpec(states_per_trajectory=2, steps=4, cfg=3.0, batch=8, seed=1),
                            fit_spec=TextFitSpec(steps=12, batch=8, eval_every=4, lr=3e-3, val_fraction=0.0),
                            width=32, family="ZImage", layout=teacher.layout())
    back = hgr_file.load_hgr(out, family="ZImage")
    assert (back.config.layout, back.config.empty_length) == (1, encode(clip, "")[0][0].shape[1])
    st = load_file(str(tmp_path / "cache" / "text_states.safetensors"))
    assert len(st["lengths"].unique()) > 1
    idx = st["harmful"].nonzero().flatten()

    def loss(net):
        total = []
        with torch.no_grad():
            for i in idx.tolist():
                n = int(st["lengths"][st["prompt"][i]])
                c = st["embeddings"][st["prompt"][i]][None, :n]
                pred = teacher.denoise_embedding(st["x"][i:i + 1], st["sigma"][i:i + 1], net(c))
                total.append(relative_loss(pred, st["target"][i:i + 1], st["scale"][i:i + 1]))
        return float(torch.cat(total).mean())

    assert loss(back.net) < 0.9 * loss(TextHGRNet(back.config, back.net.empty))
    with pytest.raises(ValueError, match=r"the text HGR.s rewriter and on-policy rounds, and the safe fine-tune "
                                         r"driven by a text HGR, need one length"):
        add_rewriter(back, teacher.embed, data)


@pytest.mark.parametrize("family", [f for f in ("sd3", "flux", "chroma", "qwen_image", "lumina2", "z_image", "hidream")
                                    if f in BUILT])
def test_harm_detector_on_image_families_with_their_16_channel_vaes(family):
    """The harm detector on flow-matching image families: images encoded by the family's 16-channel VAE
    (TAESD's 16-channel layout; for Qwen-Image, Wan's video VAE, each image a clip of one frame), scored
    by a 16-channel latent HGR without the prompt and by a text HGR of the sequence layout with it; a
    batch scores every image as it scores alone; a 4-channel VAE is refused naming both channel counts;
    a text HGR without the prompt is refused. (SD3, Chroma and Qwen-Image read Flux's tiny T5 + CLIP-L,
    Lumina 2 Z-Image's Qwen3, of their widths: no tiny Qwen2.5-VL or Gemma 2 is built; HiDream its own
    four, tiny.)"""
    from safecfg_pack.nodes import hgr_type
    from safecfg_pack.nodes.detect_nodes import run_detection

    m, clip, vae = tiny.tiny_family(family, 0)
    z = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if family in tiny.VIDEO_VAE_FAMILIES:
            images = torch.cat([vae.decode(z[i:i + 1, :, None]).reshape(-1, 64, 64, 3) for i in range(3)]).float()
        else:
            images = vae.decode(z).float()
    assert images.shape == (3, 64, 64, 3)
    latent = hgr_type.handle_for(_random_latent_hgr(type(m.model.latent_format).__name__), "hgr")

    def score(imgs, handle, positive=None):
        return run_detection(imgs, m, clip, vae, handle, positive, 0.5, 2, 0, 8)

    det = score(images, latent)
    assert det.scores.shape == (3,) and torch.isfinite(det.scores).all() and (det.scores > 0).all()
    for i in range(3):
        torch.testing.assert_close(score(images[i:i + 1], latent).scores[0], det.scores[i], rtol=1e-4, atol=1e-6)
    pos = encode(clip, "a red knife on a table")
    text = hgr_type.handle_for(_random_text_hgr(encode(clip, "")[0][0][0], family=tiny.DIT_FAMILIES[family]["cls"]),
                               "text_hgr.safetensors")
    with_prompt = score(images, text, pos)
    assert with_prompt.with_prompt and torch.isfinite(with_prompt.scores).all() and (with_prompt.scores > 0).all()
    with pytest.raises(ValueError, match=r"scores images only with their prompt: connect 'positive'"):
        score(images, text)
    with pytest.raises(ValueError, match=r"the VAE gives 4-channel latents but the model expects 16"):
        run_detection(images, m, clip, tiny.tiny_vae(0), latent, None, 0.5, 2, 0, 8)


@pytest.mark.skipif("wan21" not in BUILT, reason="this ComfyUI has no TAEHV or no Z-Image encoder (0.3.52); "
                                                 "make test's 0.3.75 has both")
def test_harm_detector_scores_a_wan_clip_whole_with_per_frame_scores():
    """On a video model the detector reads the IMAGE batch as the frames of one clip: encoded whole by
    the video VAE (TAEHV's 16-channel layout, 9 frames -> 3 latent frames), scored as one clip, each
    frame given its latent frame's score (the first frame alone, then 4 per latent frame) and the
    clip's flag; the report lists both; the filter acts on every frame of a flagged clip. At one noise
    level the clip's score lies between its frames' (a norm ratio over the frames)."""
    from safecfg_pack.nodes import detect_nodes, hgr_type

    m = model_for("wan21")
    clip = tiny.tiny_z_image_clip(0)  # the empty prompt only: a 32-wide embedding, as the tiny Wan reads
    vae = tiny.tiny_video_vae(0)
    with torch.no_grad():
        frames = vae.decode(torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    frames = frames.reshape(-1, *frames.shape[-3:]).float()
    assert frames.shape == (9, 64, 64, 3)
    h = hgr_type.handle_for(_random_latent_hgr("Wan21"), "wan_hgr")
    det = detect_nodes.run_detection(frames, m, clip, vae, h, None, 1e-6, 1, 0, 8)
    assert det.scores.shape == (9,) and det.per_frame.shape == (1, 3) and det.flags.all()
    assert det.clip[3] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    torch.testing.assert_close(det.scores, det.per_frame[0, torch.tensor(det.clip[3])])
    clip_score = det.clip[2]
    assert float(det.per_frame.min()) - 1e-6 <= clip_score <= float(det.per_frame.max()) + 1e-6
    report = det.report()
    assert "a video clip of 9 frame(s) FLAGGED" in report and "frame 8 (latent frame 2)" in report
    (out, safe_images, flagged, idx) = detect_nodes.HGRHarmFilter.execute(frames, det, "black", 16).result[:4]
    assert idx == ",".join(map(str, range(9))) and float(out.abs().max()) == 0.0
    calm = detect_nodes.run_detection(frames, m, clip, vae, h, None, 1e6, 1, 0, 8)
    assert not calm.flags.any() and torch.equal(calm.scores, det.scores)
    with pytest.raises(ValueError, match=r"the VAE is an image VAE but the model \(WAN21_T2V\) samples video"):
        detect_nodes.run_detection(frames, m, clip, tiny.tiny_vae(0, latent_channels=16), h, None, 0.5, 1, 0, 8)
    with pytest.raises(ValueError, match=r"the VAE is a video VAE but the model \(Flux\) samples images"):
        flux = hgr_type.handle_for(_random_latent_hgr("Flux"), "f")
        detect_nodes.run_detection(frames, model_for("flux"), tiny.tiny_flux_clip(0), vae, flux, None, 0.5, 1, 0, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_learned_hgrs_of_both_kinds_drive_every_family(family):
    """On every family, with its own conditioning extras: a text HGR (sequence layout) through the patch
    samples exactly as core CFG with ``HGR(c)`` as the negative, and a 16-channel latent HGR through the
    patch changes the sample (finite), each refused on a family it was not made for."""
    from safecfg_pack.nodes import guidance_nodes, hgr_type

    m = model_for(family)
    pos, neg, _ = conds(family)
    shape = tiny.dit_latent_shape(family)
    cls = tiny.DIT_FAMILIES[family]["cls"]
    text = hgr_type.handle_for(_random_text_hgr(neg[0][0][0], family=cls), f"{family}_text.safetensors")
    u = text.redirector.uncond(pos[0][0])
    want = ksample(m, pos, [[u, dict(neg[0][1])]], shape, cfg=3.0)
    got = ksample(sampling.patch_model(m, text, 1.0, 0.0, 1.0), pos, neg, shape, cfg=3.0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.allclose(got, ksample(m, pos, neg, shape, cfg=3.0), atol=1e-5)
    latent = hgr_type.handle_for(_random_latent_hgr(type(m.model.latent_format).__name__), "l")
    out = ksample(sampling.patch_model(m, latent, 1.0, 0.0, 1.0), pos, neg, shape, cfg=3.0)
    assert out.shape == shape and torch.isfinite(out).all()
    assert not torch.equal(out, ksample(m, pos, neg, shape, 3.0))
    other = "flux" if family != "flux" else "sd3"  # another family (HiDream's width is its own: that is said)
    with pytest.raises(ValueError, match=rf"text HGR '{family}_text.safetensors' (was trained for {cls} text "
                                         rf"embeddings but the model connected is|reads \d+-wide text embeddings "
                                         rf"\({cls}\))"):
        guidance_nodes.HGRSafeCFGPatch.execute(model=model_for(other), hgr=text, strength=1.0, start_percent=0.0,
                                               end_percent=1.0)


@pytest.mark.parametrize("family", BUILT)
def test_safe_finetune_writes_a_lora_that_comfyui_applies_to_the_family(family, tmp_path):
    """The unsupervised safe fine-tune on each flow-matching family (Flux: in-place blocks; Z-Image:
    prompts of different token counts; Wan: video clips), driven by a 16-channel latent HGR: a LoRA on
    the transformer's attention layers, every key of which ComfyUI's own LoRA loader maps onto the
    model, and which changes its samples."""
    import comfy.sd
    from safetensors.torch import load_file

    from safecfg_pack.nodes.finetune_nodes import run_finetune
    from safecfg_pack.safecfg.finetune import FinetuneSpec

    m, clip, _ = tiny.tiny_family(family, 0)
    hgr = _random_latent_hgr(type(m.model.latent_format).__name__)
    prompts = ["a red knife", "a cat", "a skull on a wooden table", "a blue house"]
    out = tmp_path / f"{family}_safe_lora.safetensors"
    spec = FinetuneSpec(rank=4, steps=8, batch=4, lr=1e-2, threshold=0.05, states_per_trajectory=2, traj_steps=3,
                        cfg=3.0)
    summary = run_finetune(m, clip, prompts, out, spec, redirector=hgr, image_size=64, state_dir=tmp_path / "state")
    assert summary["samples"] > 0
    sd = load_file(str(out))
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    patched, _ = comfy.sd.load_lora_for_models(m, None, sd, 1.0, 0.0)
    assert len(patched.patches) == len(downs)  # every LoRA module mapped onto a model weight
    pos, neg, _ = conds(family)
    shape = tiny.dit_latent_shape(family)
    a, b = ksample(patched, pos, neg, shape, cfg=3.0), ksample(m, pos, neg, shape, cfg=3.0)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_text_hgr_at_cfg_one_redirects_a_distilled_model():
    """The paper's HGR at cfg 1 (Flux dev as sampled, guidance embed 3.5): the unconditional branch has
    no weight there, so SafeCFG evaluates ``D(x, HGR(c))`` and the user's negative and gives the safe
    prediction the HGR was trained to stand for, ``D_c - (w - 1) / w * (D(x, HGR(c)) - D_n)`` (``w`` its
    training cfg, from the file's record), at every step (checked against a separate model call); 3 rows
    a step, in one batched call from the second step on; the guider gives the same samples; strength 0
    is core's cfg-1 sampling bit for bit."""
    import json

    from safecfg_pack.nodes import hgr_type

    m = model_for("flux")
    pos, neg, _ = conds("flux")
    shape = tiny.dit_latent_shape("flux")
    hgr = _random_text_hgr(neg[0][0][0], family="Flux")
    hgr.metadata = {"training": json.dumps({"cfg": 4.0})}
    assert hgr.train_cfg == 4.0
    h = hgr_type.handle_for(hgr, "flux_text.safetensors")
    u = hgr.uncond(pos[0][0])
    checks = []

    def post(args):
        model, x, sigma = args["model"], args["input"], args["sigma"]
        rows = [pos, [[u, dict(neg[0][1])]], neg]
        enc = [comfy.samplers.encode_model_conds(model.extra_conds, comfy.sampler_helpers.convert_cond(c), x,
                                                 x.device, "positive") for c in rows]
        d_c, d_h, d_n = comfy.samplers.calc_cond_batch(model, enc, x, sigma, {})
        checks.append(((args["denoised"] - (d_c - 0.75 * (d_h - d_n))).abs().max() / d_c.abs().max()).item())
        return args["denoised"]

    patched = sampling.patch_model(m, h, 1.0, 0.0, 1.0)
    rows = count_rows(patched)
    patched.set_model_sampler_post_cfg_function(post)
    out = ksample(patched, pos, neg, shape, cfg=1.0)
    assert len(checks) == STEPS and max(checks) < 1e-5, checks
    assert rows == [2, 1] + [3] * (STEPS - 1), rows
    ref = ksample(m, pos, neg, shape, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-5)
    g = safe(m, h, pos, neg, shape, cfg=1.0)
    assert (g - out).abs().max() <= 1e-5 * out.abs().max()
    assert torch.equal(ksample(sampling.patch_model(m, h, 0.0, 0.0, 1.0), pos, neg, shape, cfg=1.0), ref)
