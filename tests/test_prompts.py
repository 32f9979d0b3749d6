"""Prompts as users write them: longer than one CLIP chunk (150+ tokens: several 77-token chunks) and
with weights (``(knife:1.3)``), through the guider, the patch, the concept redirector (both stages),
the paper's text HGR, the teacher (training) and the detector, on tiny real models."""

from __future__ import annotations

import pytest
import torch
from test_guidance import (
    concept,
    core_guider,
    encode,
    ksample,
    latent,
    node_out,
    safe_guider,
    safe_patch,
    sample_guider,
)
from test_text_hgr import text_dir  # noqa: F401  (fixture)

from safecfg_pack.nodes import detect_nodes
from safecfg_pack.nodes.teacher import ComfyTeacher

LONG = ", ".join(["a (red knife:1.3) on a wooden table beside a small blue house"] * 16)
WEIGHTED = "a (red knife:1.4) on a table, (blurry:0.6)"


def reduced(clip, text):
    """What a path that mishandled ``text`` would see: the long prompt cut to its first CLIP chunk, the
    weighted prompt without its weights. A result equal to the reduced prompt's means the path lost
    something."""
    if text == LONG:
        c = encode(clip, text)
        return [[c[0][0][:, :77], dict(c[0][1])]]
    return encode(clip, "a red knife on a table, blurry")


def test_the_prompts_are_what_they_claim(sd15):
    clip = sd15.clip
    long = encode(clip, LONG)[0][0]
    assert long.shape[1] >= 3 * 77, "the long prompt spans three CLIP chunks or more"
    plain = encode(clip, "a red knife on a table, blurry")[0][0]
    assert not torch.equal(encode(clip, WEIGHTED)[0][0], plain)  # the weights change the embedding


@pytest.mark.parametrize("text", [LONG, WEIGHTED], ids=["long", "weighted"])
@pytest.mark.parametrize("mode", ["global", "patch"])
def test_concept_redirector_on_long_and_weighted_prompts(text, mode, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, text), encode(clip, "blurry")
    (red,) = node_out("HGRConceptRedirector", clip=clip, concepts="weapon: knife, dagger -> spoon", threshold=-1.0,
                      push=0.0, mode=mode)
    ref = ksample(model, pos, neg)
    assert torch.equal(ksample(safe_patch(model, red, strength=0.0), pos, neg), ref)
    on = ksample(safe_patch(model, red), pos, neg)
    assert torch.isfinite(on).all() and not torch.equal(on, ref)
    core = sample_guider(core_guider(model, pos, neg, 5.0), model, latent())
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, red, strength=0.0), model, latent()), core)
    guided = sample_guider(safe_guider(model, pos, neg, red), model, latent())
    assert torch.isfinite(guided).all() and not torch.equal(guided, core)


@pytest.mark.parametrize("text", [LONG, WEIGHTED], ids=["long", "weighted"])
def test_text_hgr_on_long_and_weighted_prompts(text, sd15, text_dir):  # noqa: F811
    model, clip, _ = sd15
    pos, neg = encode(clip, text), encode(clip, "")
    (h,) = node_out("HGRLoader", hgr_name="text_random.safetensors")
    ref = ksample(model, pos, neg)
    assert torch.equal(ksample(safe_patch(model, h, strength=0.0), pos, neg), ref)
    on = ksample(safe_patch(model, h), pos, neg)
    assert torch.isfinite(on).all() and not torch.equal(on, ref)
    guided = sample_guider(safe_guider(model, pos, neg, h), model, latent())
    assert torch.isfinite(guided).all()
    assert (guided - on).abs().max() <= 1e-4 * on.abs().max()  # guider and patch agree
    cut = sample_guider(safe_guider(model, reduced(clip, text), neg, h), model, latent())
    assert not torch.allclose(guided, cut, rtol=1e-4, atol=1e-4), "the whole prompt did not reach the model"


def test_teacher_batches_prompts_of_different_lengths(sd15):
    """Training data mixes short prompts and long ones: one batched call, each row as it is alone."""
    teacher = ComfyTeacher(sd15.model, sd15.clip, width=64, height=64)
    batch = teacher.batch_cond(["a red knife", LONG, WEIGHTED])
    assert batch[0][0].shape[0] == 3
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 2.0)
    (together,) = teacher.denoise(x, sigma, [["a red knife", LONG, WEIGHTED]])
    for i, text in enumerate(["a red knife", LONG, WEIGHTED]):
        (alone,) = teacher.denoise(x[i:i + 1], sigma[i:i + 1], [[text]])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    states, x0 = teacher.trajectories(["a red knife", LONG], seed=0, steps=3, cfg=5.0)
    assert len(states) == 3 and torch.isfinite(x0).all()


@pytest.mark.parametrize("text", [LONG, WEIGHTED], ids=["long", "weighted"])
def test_detector_with_a_long_or_weighted_prompt(text, sd15):
    hgr = concept(sd15.clip, "a red knife")
    imgs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    det = detect_nodes.run_detection(imgs, sd15.model, sd15.clip, sd15.vae, hgr, encode(sd15.clip, text), 0.0, 2,
                                     0, 8)
    assert det.scores.shape == (2,) and torch.isfinite(det.scores).all()
    cut = detect_nodes.run_detection(imgs, sd15.model, sd15.clip, sd15.vae, hgr, reduced(sd15.clip, text), 0.0, 2,
                                     0, 8)
    assert not torch.allclose(det.scores, cut.scores, rtol=1e-5, atol=1e-6), "the whole prompt was not scored"
