"""The toy world: generator, held-out names, bundled model and demo loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toyworld import world


def test_generator_is_deterministic_and_varied():
    a, sa = world.batch(5, 16, harmful_p=0.5)
    b, sb = world.batch(5, 16, harmful_p=0.5)
    c, _ = world.batch(6, 16, harmful_p=0.5)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and [s.caption for s in sa] == [s.caption for s in sb]
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_world_has_required_richness():
    assert len(world.CLEAN_CLASSES) >= 8 and len(world.COLOURS) >= 6 and len(world.BACKGROUNDS) >= 3
    assert len(world.HARMFUL) >= 2
    for cat, (obj, names) in world.HARMFUL.items():
        assert len(names) >= 3 and obj not in world.CLEAN_CLASSES
        assert world.HELD_OUT_NAMES[cat] not in world.TRAIN_NAMES[cat]
        assert set(world.TRAIN_NAMES[cat]) | {world.HELD_OUT_NAMES[cat]} == set(names)


def test_every_class_draws_a_distinct_shape():
    rng = np.random.default_rng(0)
    imgs = {c: world.render(world.prompt_scene(c, "red", c, "light", rng), rng) for c in world.CLASSES}
    masks = {c: (np.abs(im - im[0, 0]).sum(-1) > 0.3) for c, im in imgs.items()}
    for c, m in masks.items():
        assert m.sum() > 60, c  # visible
    names = list(masks)
    for i, c1 in enumerate(names):
        for c2 in names[i + 1:]:
            iou = (masks[c1] & masks[c2]).sum() / (masks[c1] | masks[c2]).sum()
            assert iou < 0.85, (c1, c2, iou)


def test_captions_name_objects_and_colours():
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = world.sample_scene(rng, harmful_p=0.5)
        full = world.caption(s, full=True)
        for o in s.objects:
            assert o.colour in full and o.name in full and o.name in world.CLASS_NAMES[o.cls]


@pytest.fixture(scope="module")
def bundle():
    from toyworld import models

    for kind in ("unet", "clip", "vae", "oracle"):
        if not models.weights_path(kind).is_file():
            pytest.fail(f"bundled toy-world weights missing: {models.weights_path(kind)} (run make toy-train)")
    return models


def test_demo_loader_gives_objects_core_nodes_accept(bundle, pack, run_prompt):
    """HGRDemoModelLoader -> CLIPTextEncode -> KSampler -> VAEDecode, and SamplerCustomAdvanced with the
    SafeCFG guider, through ComfyUI's executor."""
    g = {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red star on dots", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "HGRConceptRedirector", "inputs": {"clip": ["1", 1], "concepts": "weapon: knife",
                                                               "threshold": 0.2, "push": 0.0, "mode": "global"}},
        "9": {"class_type": "HGRSafeCFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                           "negative": ["3", 0], "hgr": ["8", 0], "cfg": 5.0,
                                                           "strength": 1.0, "start_percent": 0.0,
                                                           "end_percent": 1.0}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["12", 0], "guider": ["9", 0],
                                                                 "sampler": ["10", 0], "sigmas": ["11", 0],
                                                                 "latent_image": ["4", 0]}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
    }
    out = run_prompt(g)
    assert len(out["7"]["images"]) == 2 and len(out["15"]["images"]) == 2


def test_bundled_vae_reconstructs_and_oracle_reads_generator_images(bundle):
    import torch

    from toyworld.models import load_sd, load_vae, weights_path
    from toyworld.oracle import Oracle, classify

    imgs, scenes = world.batch(4242, 64, harmful_p=0.3, two_p=0.0)
    x = torch.from_numpy(imgs)
    vae = load_vae()
    lat = vae.encode(x)
    assert lat.shape == (64, 4, 8, 8)
    rec = vae.decode(lat).float()
    assert (rec - x).abs().mean() < 0.08
    oracle = Oracle()
    oracle.load_state_dict(load_sd(weights_path("oracle")))
    out = classify(oracle, x)
    acc = np.mean([int(out["presence"][i].argmax()) == world.CLASSES.index(s.objects[0].cls)
                   for i, s in enumerate(scenes)])
    assert acc >= 0.9
    assert bool((out["harmful"] == torch.tensor([s.harmful for s in scenes])).float().mean() >= 0.9)


def test_eval_splits_keep_held_out_names_apart():
    from toyworld.eval.prompts import HARM_WORDS, make_prompts

    held = set(world.HELD_OUT_NAMES.values())
    harmful = make_prompts("harmful", 200, 1)
    heldout = make_prompts("heldout", 200, 2)
    clean = make_prompts("clean", 200, 3)
    assert all(not (set(t.split()) & held) for t, *_ in harmful)
    assert all(set(t.split()) & held for t, *_ in heldout)
    assert {c for _, c, *_ in harmful} == set(world.HARMFUL_CLASSES) == {c for _, c, *_ in heldout}
    assert {c for _, c, *_ in clean} == set(world.CLEAN_CLASSES)
    assert not (set(HARM_WORDS.replace(",", " ").split()) & held)
    import json
    from pathlib import Path

    data = (Path(__file__).resolve().parents[1] / "data" / "toyworld_hgr.json").read_text()
    pairs = json.loads(data)
    words = {w for p in pairs["pairs"] for w in (p["harmful"] + " " + p["safe"]).split()}
    words |= {w for c in pairs["clean"] for w in c.split()}
    assert not (words & held), "held-out names leaked into HGR training data"


def test_demo_and_benchmark_use_the_calibrated_concept_setting():
    """`make demo`'s concept node and `make eval` use the setting `make calibrate` chose, which names
    no held-out name."""
    import json
    from pathlib import Path

    from toyworld.eval.baselines import CONCEPT_DEFAULT, CONCEPTS, parse_concept_setting

    repo = Path(__file__).resolve().parents[1]
    calib = json.loads((repo / "results" / "calibration.json").read_text())
    assert CONCEPT_DEFAULT == calib["concept_setting"] and calib["held_out_names_used"] is False
    want, start = parse_concept_setting(CONCEPT_DEFAULT)
    graph = json.loads((repo / "workflows" / "toy_demo.api.json").read_text())
    node = next(n["inputs"] for n in graph.values() if n["class_type"] == "HGRConceptRedirector")
    assert (node["threshold"], node["push"], node["mode"]) == (want["threshold"], want["push"], want["mode"])
    assert node.get("push_threshold", want["threshold"]) == want["push_threshold"]
    assert node.get("push_memory", 0.0) == want["push_memory"]
    assert node["concepts"] == CONCEPTS
    assert not (set(CONCEPTS.replace(",", " ").replace(":", " ").split()) & set(world.HELD_OUT_NAMES.values()))


def test_calibration_choices():
    """The concept setting: the lowest harmful rate within the allowed clean drop; the detection
    threshold: the most true positives flagging at most the allowed share of clean images."""
    from toyworld.calibrate import choose, detection_threshold

    runs = {"methods": {
        "plain": {"clean_accuracy": 0.93, "harmful_rate": 0.99, "clean_distance": 0.0},
        "concept[a]": {"clean_accuracy": 0.93, "harmful_rate": 0.40, "clean_distance": 0.02},
        "concept[b]": {"clean_accuracy": 0.92, "harmful_rate": 0.10, "clean_distance": 0.03},
        "concept[c]": {"clean_accuracy": 0.90, "harmful_rate": 0.05, "clean_distance": 0.03}}}
    assert choose(runs, 0.01)[0] == "b" and choose(runs, 0.03)[0] == "c" and choose(runs, 0.0)[0] == "a"
    clean = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]
    harmful = [0.9, 1.0, 1.1, 0.65]
    thr, tpr, fpr = detection_threshold(harmful, clean, 0.1)
    assert fpr <= 0.1 and tpr == 0.75 and 0.8 < thr < 0.9  # one clean image (0.95) may be flagged
    thr, tpr, fpr = detection_threshold(harmful, clean, 0.0)
    assert fpr == 0.0 and thr > 0.95 and tpr == 0.5


def test_sld_guider_without_safety_steps_is_plain_cfg(sd15):
    import comfy.sample
    import comfy.samplers
    import torch

    from toyworld.eval.baselines import sld_guider_class

    model, clip, _ = sd15
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    safety = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    lat = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(lat, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    sampler = comfy.samplers.sampler_object("euler")
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(pos, neg)
    plain.set_cfg(5.0)
    ref = plain.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=0)
    SLD = sld_guider_class()
    outs = []
    for warm in (1.0, 0.0):
        g = SLD(model)
        g.set_conds(pos, neg)
        g.set_sld(safety, 4, p={"warmup_frac": warm, "guidance": 1000.0, "threshold": 0.01,
                                "momentum_scale": 0.3, "mom_beta": 0.4})
        g.set_cfg(5.0)
        outs.append(g.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=0))
    torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-4)  # warm-up covers every step
    assert not torch.allclose(outs[1], ref, atol=1e-3)  # the safety guidance acts after warm-up


def test_bundled_toy_hgr_drives_the_toy_model(bundle, pack, run_prompt):
    g = {
        "1": {"class_type": "HGRDemoModelLoader", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a purple knife on stripes", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "HGRLoader", "inputs": {"hgr_name": "toyworld_hgr.safetensors"}},
        "6": {"class_type": "HGRSafeCFGPatch", "inputs": {"model": ["1", 0], "hgr": ["5", 0], "strength": 1.0,
                                                          "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "seed": 1, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    out = run_prompt(g)
    assert len(out["9"]["images"]) == 1


def test_fine_tuning_pool_is_unlabelled_disjoint_from_the_benchmark_and_matches_its_generator():
    """data/toyworld_pool.txt: captions of the toy world's training templates (training names only), no
    string the benchmark or calibration can draw, and exactly what toyworld.pool builds from its seed."""
    from toyworld import pool
    from toyworld.eval.prompts import benchmark_strings, make_prompts

    lines = pool.POOL.read_text(encoding="utf-8").splitlines()
    prompts, labels = pool.build()
    assert lines == prompts and len(set(lines)) == len(lines) >= 1000
    banned = benchmark_strings()
    for split, seed in (("clean", 2024), ("harmful", 2025), ("heldout", 2026), ("clean", 7), ("harmful", 8)):
        assert {t for t, *_ in make_prompts(split, 200, seed)} <= banned  # the set covers what is drawn
    assert not (set(lines) & banned)
    held = set(world.HELD_OUT_NAMES.values())
    assert not any(set(t.split()) & held for t in lines)
    assert 0.3 < sum(labels) / len(labels) < 0.5  # harmful captions are there, unlabelled, as in real use
    stored = json.loads(pool.LABELS.read_text())["harmful"]
    assert [stored[t] for t in lines] == labels


def test_benchmark_intervals():
    """Wilson intervals for rates (textbook values), bootstrap intervals around a mean."""
    import numpy as np

    from toyworld.eval.metrics import bootstrap_ci, rate_ci, wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    assert wilson(0, 0) == [0.0, 1.0] and rate_ci([True] * 200)[1] == 1.0
    v = np.random.default_rng(0).normal(1.0, 0.5, 400)
    a, b = bootstrap_ci(v)
    assert a < v.mean() < b and 0.05 < b - a < 0.15 and bootstrap_ci(v) == [a, b]


def test_frechet_distance_interval_holds_the_measured_value():
    """Resampling inflates the Frechet distance; the bias-corrected interval still brackets the value."""
    import numpy as np

    from toyworld.eval.metrics import bootstrap_ci, frechet_distance

    rng = np.random.default_rng(1)
    real, gen = rng.normal(0, 1, (200, 16)), rng.normal(0.2, 1.1, (200, 16))
    fd = frechet_distance(gen, real)
    raw = bootstrap_ci(gen, lambda f: frechet_distance(f, real), n=100)
    lo, hi = bootstrap_ci(gen, lambda f: frechet_distance(f, real), n=100, bias_correct=True)
    assert raw[0] > fd  # the uncorrected interval misses the value: what the correction is for
    assert lo < fd < hi
