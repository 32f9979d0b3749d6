"""Tensor-level tests of the redirection math (no ComfyUI)."""

import pytest
import torch

from safecfg_pack.safecfg.hgr_net import HGRConfig, HGRNet, LearnedHGR
from safecfg_pack.safecfg.redirect import ConceptRedirector, blend, concept_redirect, hed


def _orth_pair(shape=(2, 4, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=gen)
    o = torch.randn(shape, generator=gen)
    # make o orthogonal to h per sample
    hf, of = h.flatten(1), o.flatten(1)
    of = of - (of * hf).sum(1, keepdim=True) / (hf * hf).sum(1, keepdim=True) * hf
    return h, of.view(shape)


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_concept_removes_stated_share_and_keeps_orthogonal(strength):
    h, o = _orth_pair()
    g = 3.0 * h + 0.5 * o  # strongly aligned with h (cos ~ 0.99)
    uncond = torch.randn_like(g)
    red = ConceptRedirector(1, tau=0.2, ramp=0.1)
    r = red.redirect(g, torch.tensor([5.0, 5.0]), uncond=uncond, concept_preds=[uncond + h])
    g_s = blend(g, r.g_red, strength)
    expected = (1 - strength) * 3.0 * h + 0.5 * o
    torch.testing.assert_close(g_s, expected, rtol=1e-4, atol=1e-4)
    # the orthogonal component is untouched
    of = o.flatten(1)
    comp = (g_s.flatten(1) * of).sum(1) / (of * of).sum(1)
    torch.testing.assert_close(comp, torch.full((2,), 0.5), rtol=1e-5, atol=1e-5)
    assert torch.all(r.hed > 0.9)


def test_concept_below_threshold_is_bit_identical():
    h, o = _orth_pair(seed=1)
    g = 0.05 * h + 2.0 * o  # cos ~ 0.025 < tau
    out = concept_redirect(g, [h], tau=0.2, ramp=0.1)
    assert torch.equal(out, g)
    assert torch.equal(blend(g, out, 1.0), g)
    assert torch.all(hed(g, out) == 0)


def test_concept_per_sample_independent():
    h, o = _orth_pair(shape=(3, 4, 8, 8), seed=2)
    g = torch.stack([3 * h[0] + o[0], 0.01 * h[1] + o[1], -2 * h[2] + o[2]])
    out = concept_redirect(g, [h], tau=0.2)
    torch.testing.assert_close(out[0], o[0], atol=1e-4, rtol=1e-4)  # aligned: removed
    assert torch.equal(out[1], g[1])  # not aligned: untouched
    assert torch.equal(out[2], g[2])  # anti-aligned (moving away from concept): untouched


def test_near_duplicate_concepts_do_not_double_remove():
    h, o = _orth_pair(seed=3)
    g = 2 * h + o
    once = concept_redirect(g, [h], tau=0.2)
    twice = concept_redirect(g, [h, h * 1.5], tau=0.2)
    torch.testing.assert_close(once, twice, atol=1e-4, rtol=1e-4)


def test_push_applies_only_above_its_own_threshold():
    h, o = _orth_pair(shape=(2, 4, 8, 8), seed=5)
    hf, of = h.flatten(1), o.flatten(1)
    # sample 0: cos ~ 0.45 (projection gate open, push gate closed); sample 1: cos ~ 0.95 (both open)
    a = torch.tensor([0.5, 3.0]).view(2, 1, 1, 1) * (of.norm(dim=1) / hf.norm(dim=1)).view(2, 1, 1, 1)
    g = a * h + o
    out = concept_redirect(g, [h], tau=0.2, ramp=0.1, push=1.0, push_tau=0.7)
    torch.testing.assert_close(out[0], o[0], atol=1e-4, rtol=1e-4)  # component removed, no push
    torch.testing.assert_close(out[1], o[1] - h[1], atol=1e-4, rtol=1e-4)  # removed and pushed by 1 * h
    # with the push threshold equal to tau both samples are pushed (the single-threshold rule)
    same = concept_redirect(g, [h], tau=0.2, ramp=0.1, push=1.0)
    torch.testing.assert_close(same[0], o[0] - h[0], atol=1e-4, rtol=1e-4)
    # below both thresholds nothing moves, whatever the push
    far = 0.05 * h + o
    assert torch.equal(concept_redirect(far, [h], tau=0.2, push=2.0, push_tau=0.5), far)


def _aligned(cos_value: float, seed: int = 6):
    """g with the given cosine to h (one sample), h and the orthogonal part."""
    h, o = _orth_pair(shape=(1, 4, 8, 8), seed=seed)
    a = cos_value / (1 - cos_value ** 2) ** 0.5 * float(o.norm() / h.norm())
    return a * h + o, h, o


def test_push_memory_needs_sustained_alignment():
    red = ConceptRedirector(1, tau=0.2, ramp=0.1, push=1.0, push_tau=0.6, memory=0.7)
    u = torch.zeros(1, 4, 8, 8)
    low, h, o = _aligned(0.3)
    high, _, _ = _aligned(0.95)
    state: dict = {}

    def pushed(g, sigma):
        r = red.redirect(g, torch.tensor([sigma]), uncond=u, concept_preds=[h], state=state)
        # pushed <=> the result has a negative component along h (removal alone leaves 0)
        return float((r.g_red.flatten() * h.flatten()).sum()) < -1e-3

    # one aligned step after low ones: the running average stays below 0.6, no push
    assert not pushed(low, 10.0) and not pushed(low, 9.0) and not pushed(high, 8.0)
    # the alignment persists: the evidence builds up and the push starts
    assert pushed(high, 7.0) or pushed(high, 6.0)
    # a new run (sigma rises) starts from scratch: the first low step does not push
    assert not pushed(low, 10.0)
    # without a run state (detection) each call stands alone: a high cosine pushes at once
    r = red.redirect(high, torch.tensor([5.0]), uncond=u, concept_preds=[h])
    assert float((r.g_red.flatten() * h.flatten()).sum()) < -1e-3
    with pytest.raises(ValueError, match="memory"):
        ConceptRedirector(1, memory=1.0)


def test_push_goes_away_from_all_concepts():
    """Pushing away from one concept moves away from every concept, not towards another."""
    h1, o = _orth_pair(shape=(1, 4, 8, 8), seed=7)
    h2 = torch.roll(h1, 3, dims=-1) + 0.5 * o
    g = 3.0 * h1 + 0.3 * o
    out = concept_redirect(g, [h1, h2], tau=0.2, push=1.0, push_tau=0.5)
    for h in (h1, h2):
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), h.flatten(1))
        assert float(cos) < 0.0


def test_patch_mode_acts_locally():
    h, o = _orth_pair(shape=(1, 4, 8, 8), seed=4)
    h = h.clone()
    h[..., 4:, :] = 0  # the concept lives in the top half only
    g = o.clone()
    g[..., :4, :] += 5 * h[..., :4, :]
    out = concept_redirect(g, [h], tau=0.2, patch=4)
    torch.testing.assert_close(out[..., :4, :], o[..., :4, :] - (o[..., :4, :] * 0), atol=2.0, rtol=0)
    assert torch.equal(out[..., 4:, :], g[..., 4:, :])  # the bottom half is untouched
    assert (out[..., :4, :] - g[..., :4, :]).abs().sum() > 1.0


def test_untrained_hgr_is_identity_and_trained_is_not():
    torch.manual_seed(0)
    net = HGRNet(HGRConfig(width=16, mults=[1, 2], embed_dim=16))
    hgr = LearnedHGR(net)
    g = torch.randn(2, 4, 7, 9)  # odd sizes work
    u = torch.randn(2, 4, 7, 9)
    r = hgr.redirect(g, torch.tensor([2.0, 2.0]), uncond=u)
    assert torch.equal(r.g_red, g) and torch.all(r.hed == 0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    r = hgr.redirect(g, torch.tensor([2.0, 2.0]), uncond=u)
    assert r.g_red.shape == g.shape and not torch.equal(r.g_red, g) and torch.all(r.hed > 0)


def test_nonfinite_redirection_falls_back_to_plain(caplog):
    net = HGRNet(HGRConfig(width=16, mults=[1], embed_dim=16))
    with torch.no_grad():
        net.conv_out.bias.fill_(float("nan"))
    hgr = LearnedHGR(net)
    g = torch.randn(2, 4, 8, 8)
    r = hgr.redirect(g, torch.tensor([1.0, 1.0]), uncond=torch.randn_like(g))
    assert torch.equal(r.g_red, g)
    assert "non-finite" in caplog.text


def test_zero_guidance_is_finite():
    g = torch.zeros(2, 4, 8, 8)
    h = torch.randn_like(g)
    out = concept_redirect(g, [h])
    assert torch.isfinite(out).all() and torch.isfinite(hed(g, out)).all()


def test_config_limits_reject_hostile_values():
    for bad in [dict(width=10**6), dict(mults=[1] * 50), dict(latent_channels=0), dict(blocks=True)]:
        with pytest.raises(ValueError):
            HGRConfig(**bad).validate()


def test_replacement_puts_the_removed_share_back_along_the_safe_concept():
    """``a -> b``: what is removed along the harmful direction comes back along the safe one, at the
    harmful one's size; below the threshold nothing changes, bit for bit."""
    h, o = _orth_pair(seed=3)
    s = torch.randn_like(h)  # the safe concept's direction
    hf, sf, of = h.flatten(1), s.flatten(1), o.flatten(1)
    for other in (hf, of):  # orthogonal to h and o, so every component can be read off
        sf = sf - (sf * other).sum(1, keepdim=True) / (other * other).sum(1, keepdim=True) * other
    s = 2.5 * sf.view_as(h)
    g = 3.0 * h + 0.5 * o
    out = concept_redirect(g, [h], tau=0.2, ramp=0.1, replacements=[s])
    expected = 3.0 * h.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / s.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * s \
        + 0.5 * o
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    weak = 0.05 * h + 2.0 * o
    assert torch.equal(concept_redirect(weak, [h], tau=0.2, ramp=0.1, replacements=[s]), weak)
    # the redirector reads harmful rows, then safe rows; a concept without a target only erases
    red = ConceptRedirector(2, tau=0.2, ramp=0.1, targets=[0, None], num_safe=1)
    assert red.num_concepts == 3
    u = torch.randn_like(g)
    r = red.redirect(g, torch.tensor([5.0, 5.0]), uncond=u, concept_preds=[u + h, u + o * 0 + h * 0 + 1e-3, u + s])
    torch.testing.assert_close(r.g_red, expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="targets must give"):
        ConceptRedirector(1, targets=[1], num_safe=1)
