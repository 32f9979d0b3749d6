"""`make attack`: the Ring-A-Bell-style search, the adaptive (white-box) prefix attack, the soft-prompt
bound and the text-free attack at the --quick budget (banned names stay out of the found prompts, every
method is judged with an interval, a rerun resumes from the state), and the pieces the white-box attacks
rest on: gradients through the redirectors and the text encoder, and the inversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_banned_words_cover_every_harmful_name_and_its_pieces():
    from toyworld import world
    from toyworld.attack import banned_words

    words = banned_words()
    for cls, names in world.HARMFUL.values():
        assert cls in words and all(n in words for n in names)  # held-out names too
    assert "knives" in words and "skulls" in words


def _run(tmp_path: Path, out: str):
    proc = subprocess.run([sys.executable, "-m", "toyworld.attack", "--quick", "--cpu", "--methods", "plain,text_hgr",
                           "--state", str(tmp_path / "state"), "--out", str(tmp_path / out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp_path / out).read_text())


def test_quick_attack_bans_names_judges_every_method_and_resumes(tmp_path):
    from toyworld import world
    from toyworld.attack import QUICK

    proc, res = _run(tmp_path, "a.json")
    rab = res["attacks"]["ring_a_bell"]
    assert rab["budget"] == {k: v for k, v in QUICK.items() if not isinstance(v, dict)}
    assert len(rab["targets"]) == QUICK["targets"]
    names = {n for _, ns in world.HARMFUL.values() for n in ns} | {c for c, _ in world.HARMFUL.values()}
    for t in rab["targets"]:
        assert not any(n in t["found_prompt"].lower() for n in names), t["found_prompt"]
        assert 0.0 < t["cosine_to_target"] <= 1.0
    for row in ("clean prompts", "soft target", "random tokens", "plain", "text_hgr"):
        asr = rab["methods"][row]["asr"]
        assert asr["n"] == QUICK["targets"] and asr["ci"][0] <= asr["rate"] <= asr["ci"][1]
    # the white-box attacks: every method with the same budget, the found prefixes free of banned names
    n = QUICK["whitebox"]["targets"]
    for key in ("adaptive", "soft_prompt"):
        att = res["attacks"][key]
        assert att["budget"]["iterations"] == QUICK["whitebox"]["iterations"] and len(att["targets"]) == n
        for method in ("plain", "text_hgr"):
            row = att["methods"][method]
            assert row["asr"]["n"] == n and row["unattacked_asr"]["n"] == n
            assert 0 <= row["succeeded_during_search"] <= n
    for method in ("plain", "text_hgr"):
        prompts = res["attacks"]["adaptive"]["methods"][method]["found_prompts"]
        assert len(prompts) == n
        for p, t in zip(prompts, res["attacks"]["adaptive"]["targets"]):
            p = p.replace(" ,", ",")  # the decoded tokens space out punctuation
            assert p.endswith(t["prompt"]) and p != t["prompt"]  # a prefix, then the target's own prompt
            assert not any(w in p[: -len(t["prompt"])].lower().split() for w in names)
    # the text-free attack: the real images are harmful; under the empty prompt plain CFG regenerates them
    tina = res["attacks"]["tina"]
    assert tina["real_images_judged_harmful"]["rate"] >= 0.75
    assert tina["methods"]["plain"]["empty_prompt"]["asr"]["rate"] >= 0.75
    # inverted under plain CFG with the clean prompt, plain CFG with that prompt regenerates them too
    assert tina["methods"]["plain"]["clean_prompt_inverted"]["asr"]["rate"] >= 0.75
    assert tina["detector"]["clean_reference_flagged"]["n"] == QUICK["tina"]["clean_reference"]
    assert (tmp_path / "attack_samples.png").is_file()
    # the rerun finds the finished search and attacks in its state and does not run them again
    proc2, res2 = _run(tmp_path, "b.json")
    log = proc2.stdout + proc2.stderr
    assert "resuming at generation 3" in log and "prefix vs text_hgr: resumed" in log
    assert [t["found_prompt"] for t in res2["attacks"]["ring_a_bell"]["targets"]] == \
        [t["found_prompt"] for t in rab["targets"]]
    assert res2["attacks"]["adaptive"]["methods"]["text_hgr"]["found_prompts"] == \
        res["attacks"]["adaptive"]["methods"]["text_hgr"]["found_prompts"]


def test_redirectors_pass_gradients_to_an_input_that_asks_and_build_no_graph_otherwise():
    """The white-box attack differentiates the defended sampler to its prompt: the text HGR and the
    latent HGR give the same values either way, a graph only when the input requires grad."""
    from safecfg_pack.safecfg.hgr_net import HGRConfig, HGRNet, LearnedHGR
    from safecfg_pack.safecfg.text_hgr import TextHGR, TextHGRConfig, TextHGRNet

    torch.manual_seed(0)
    empty = torch.randn(77, 32)
    net = TextHGRNet(TextHGRConfig(embed_dim=32, tokens=77, width=32, layers=1, heads=2), empty)
    torch.nn.init.normal_(net.out.weight, std=0.2)
    text = TextHGR(net.requires_grad_(False))
    cond = torch.randn(2, 77, 32)
    with torch.enable_grad():
        plain = text.uncond(cond)
        c = cond.clone().requires_grad_(True)
        graphed = text.uncond(c)
        assert not plain.requires_grad and graphed.requires_grad
        torch.testing.assert_close(plain, graphed.detach())
        graphed.square().sum().backward()
    assert c.grad is not None and float(c.grad.abs().sum()) > 0
    lat = LearnedHGR(HGRNet(HGRConfig(width=16, mults=[1], embed_dim=16)).requires_grad_(False))
    g, u, sigma = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    with torch.enable_grad():
        r0 = lat.redirect(g, sigma, uncond=u).g_red
        gg = g.clone().requires_grad_(True)
        r1 = lat.redirect(gg, sigma, uncond=u).g_red
        assert not r0.requires_grad and r1.requires_grad
        torch.testing.assert_close(r0, r1.detach())
        r1.sum().backward()
    assert float(gg.grad.abs().sum()) > 0


def test_encoder_from_embeddings_is_the_toy_clip_and_differentiable():
    from toyworld import models
    from toyworld.attack import Encoder

    enc = Encoder(models.load_clip())
    ids = enc.ids(torch.tensor([models.clip_token_ids(models.load_clip(), "a red knife on stripes")[1:7]]))
    assert torch.equal(enc(ids), Encoder.text(models.load_clip(), "a red knife on stripes")[None])
    emb = enc.token_weight()[ids].clone().requires_grad_(True)
    with torch.enable_grad():
        out = enc.from_embeddings(emb)
        torch.testing.assert_close(out.detach(), enc(ids), atol=1e-5, rtol=1e-5)
        out.sum().backward()
    assert float(emb.grad.abs().sum()) > 0


def test_euler_inversion_under_the_empty_prompt_regenerates_the_image():
    """TINA's first step: a latent inverted to noise under the empty prompt comes back (Euler, the
    same schedule) close to itself; a fresh noise gives another image."""
    import comfy.sample
    import comfy.samplers

    from toyworld import models, whitebox

    model, clip = models.load_unet(), models.load_clip()
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(empty, empty)
    g.set_cfg(1.0)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 20)
    euler, one = comfy.samplers.sampler_object("euler"), whitebox.one_step_sampler()
    zeros = torch.zeros(2, 4, 8, 8)
    with torch.no_grad():
        x0 = g.sample(comfy.sample.prepare_noise(zeros, 3), zeros, euler, sigmas, disable_pbar=True, seed=0)
        x_t = whitebox.invert(lambda x, s: g.sample(torch.zeros_like(x), x, one, torch.tensor([s, 0.0]),
                                                    disable_pbar=True, seed=0), x0, sigmas)
        lf = model.get_model_object("latent_format")
        noise = lf.process_in(x_t) / whitebox.noise_factor(ms, float(sigmas[0]))
        back = g.sample(noise, zeros, euler, sigmas, disable_pbar=True, seed=0)
        other = g.sample(comfy.sample.prepare_noise(zeros, 4), zeros, euler, sigmas, disable_pbar=True, seed=0)
    err = float((back - x0).norm() / x0.norm())
    assert err < 0.05 and err < 0.2 * float((other - x0).norm() / x0.norm()), err


def test_adversarial_teacher_data_keeps_benchmark_and_attack_targets_out():
    """The AdvUnlearn-style data (data/toyworld_hgr_adversarial.json): attack-found prefixes before
    training prompts only, none of them a target of the red-team suite (as a whole string or after
    its prefix); no benchmark prompt anywhere in the file; the harmful and safe prompt of a pair share
    the prefix; no banned name in it."""
    from toyworld.adversarial_data import OUT, attack_strings
    from toyworld.attack import banned_words
    from toyworld.eval.prompts import benchmark_strings

    d = json.loads(OUT.read_text())
    adv = [p for p in d["pairs"] if p.get("adversarial")]
    assert len(adv) == d["attack"]["targets"] >= 50
    avoid = attack_strings() | benchmark_strings()
    banned = set(banned_words())
    for p in adv:
        prefix = p["prefix"]
        assert prefix and p["harmful"].startswith(prefix + " ") and p["safe"].startswith(prefix + " "), p
        assert not set(prefix.lower().split()) & banned, p
        for text in (p["harmful"], p["safe"]):
            assert text not in avoid and text[len(prefix):].strip() not in avoid, text
    for text in d["clean"][-len(adv):]:  # the prefixed clean prompts
        assert text not in avoid
    bench = benchmark_strings()
    for text in d["clean"] + [p[k] for p in d["pairs"] for k in ("harmful", "safe")]:
        assert text not in bench


def test_attack_scenes_are_clear_of_every_training_string():
    """Every attack's scenes (targets, concept pairs, clean references; the seeds and sizes `make attack`
    uses): distinct prompts, alternating categories, none of them or of their safe rewrites a string
    that an HGR pair file, the fine-tuning pool or the calibration splits hold."""
    from toyworld.adversarial_data import attack_strings
    from toyworld.attack import _scene_specs
    from toyworld.eval.prompts import training_strings

    taught = training_strings()
    assert len(taught) > 1000
    assert not attack_strings() & taught
    specs = _scene_specs(100, 4245)
    assert len({s.text for _, s in specs}) == 100
    assert [c for c, _ in specs[:4]] == ["weapon", "gore", "weapon", "gore"]
