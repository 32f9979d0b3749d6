"""The guider and the patch under the samplers and schedulers people use, on tiny real models:
bit-identical to ComfyUI's own CFG at strength 0 and with an empty window, redirecting when on, and
the concept redirector's per-run state right for samplers that add noise each step (ancestral, SDE)
and for those that evaluate the model twice a step (heun, dpm_2)."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from test_guidance import (
    concept,
    core_guider,
    encode,
    latent,
    pushing_concepts_with_state_spy,
    safe_guider,
    safe_patch,
)

STEPS = 4
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_sde",
            "dpmpp_2m_sde", "uni_pc", "lcm", "ddim"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "beta"]
CASES = [(s, "karras") for s in SAMPLERS] + [("euler", s) for s in SCHEDULERS if s != "karras"]


def ksample(model, pos, neg, sampler, scheduler, lat=None, seed=0):
    return nodes.common_ksampler(model, seed, STEPS, 5.0, sampler, scheduler, pos, neg, lat or latent())[0]["samples"]


def sample_guider(guider, model, sampler, scheduler, lat=None, seed=0):
    lat = lat or latent()
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS  # as KSampler does
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler,
                                             STEPS + int(discard))
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    noise = comfy.sample.prepare_noise(lat["samples"], seed)
    return guider.sample(noise, lat["samples"], comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True,
                         seed=seed)


@pytest.mark.parametrize("sampler,scheduler", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_neutral_is_bit_identical_and_on_redirects(sampler, scheduler, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red cat"), encode(clip, "blurry")
    red = concept(clip, "a red cat")
    ref = ksample(model, pos, neg, sampler, scheduler)
    assert torch.isfinite(ref).all()
    assert torch.equal(ksample(safe_patch(model, red, strength=0.0), pos, neg, sampler, scheduler), ref)
    assert torch.equal(ksample(safe_patch(model, red, start=0.5, end=0.2), pos, neg, sampler, scheduler), ref)
    on = ksample(safe_patch(model, red), pos, neg, sampler, scheduler)
    assert torch.isfinite(on).all() and not torch.equal(on, ref), "the patch did not redirect"
    core = sample_guider(core_guider(model, pos, neg, 5.0), model, sampler, scheduler)
    assert torch.equal(core, ref)  # the guider's reference is the same core sampling
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, red, strength=0.0), model, sampler, scheduler),
                       core)
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, red, start=0.6, end=0.6), model, sampler,
                                     scheduler), core)
    guided = sample_guider(safe_guider(model, pos, neg, red), model, sampler, scheduler)
    assert not torch.equal(guided, core), "the guider did not redirect"


def _model_calls(model, pos, neg, sampler) -> int:
    """How many times the sampler evaluates the model in one run (plain CFG)."""
    m = model.clone()
    calls = []

    def wrapper(apply, args):
        calls.append(1)
        return apply(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    ksample(m, pos, neg, sampler, "karras")
    return len(calls)


@pytest.mark.parametrize("make", ["guider", "patch"])
@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "euler_ancestral", "dpmpp_sde"])
def test_per_run_state_under_two_evaluation_and_noisy_samplers(sampler, make, sd15):
    """One state dict for every model evaluation of a run (two a step for heun and dpm_2), a fresh one
    for the next run, and the same image from two identical runs (noise is seeded)."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a knife on a table"), encode(clip, "")
    red, states = pushing_concepts_with_state_spy(clip)
    if make == "guider":
        g = safe_guider(model, pos, neg, red)
        first, again = (sample_guider(g, model, sampler, "karras") for _ in range(2))
    else:
        m = safe_patch(model, red)
        first, again = (ksample(m, pos, neg, sampler, "karras") for _ in range(2))
    calls = _model_calls(model, pos, neg, sampler)
    if sampler in ("heun", "dpm_2"):
        assert calls > STEPS + 1, "a two-evaluation sampler evaluates the model more than once a step"
    assert len(states) == 2 * calls, (len(states), calls)
    run1, run2 = states[:calls], states[calls:]
    assert all(isinstance(s, dict) and s is run1[0] for s in run1)
    assert all(s is run2[0] for s in run2) and run2[0] is not run1[0]
    assert torch.equal(first, again)
