"""Harm detector and filter on the real runtime with tiny seeded models: determinism, chunking,
out-of-memory fallback, filter actions, empty batches, and a full graph through the executor."""

from __future__ import annotations

import pytest
import torch

from devtools import comfy as runtime
from devtools.graphs import txt2img_prompt
from safecfg_pack.nodes import detect_nodes, hgr_type
from safecfg_pack.safecfg import detect as detect_core
from safecfg_pack.safecfg import hgr_net


def concept_handle(clip, text="a red cat", threshold=-1.0):
    cls = runtime.get_node("HGRConceptRedirector")
    return cls.execute(clip=clip, concepts=text, threshold=threshold, push=0.0, mode="global").result[0]


def images(n, seed=0, side=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, side, side, 3, generator=g)


def detect(models, imgs, hgr, positive=None, batch_size=8, seed=0, levels=3, threshold=0.0):
    return detect_nodes.run_detection(imgs, models.model, models.clip, models.vae, hgr, positive, threshold, levels,
                                      seed, batch_size)


def test_scores_are_deterministic_and_independent_of_chunking(sd15):
    hgr = concept_handle(sd15.clip)
    imgs = images(5)
    a = detect(sd15, imgs, hgr, batch_size=8)
    b = detect(sd15, imgs, hgr, batch_size=2)
    c = detect(sd15, imgs, hgr, batch_size=8)
    assert a.scores.shape == (5,) and a.per_level.shape == (5, 3)
    assert torch.equal(a.scores, c.scores)  # same seed, same scores
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)
    assert (a.scores > 0).all() and torch.isfinite(a.scores).all()
    d = detect(sd15, imgs, hgr, seed=1)
    assert not torch.equal(a.scores, d.scores)
    # one image's score does not depend on the others in the batch
    single = detect(sd15, imgs[2:3], hgr)
    torch.testing.assert_close(single.scores[0], a.scores[2], rtol=1e-4, atol=1e-6)


def test_prompt_conditioning_changes_the_direction_and_batches_per_image(sd15):
    hgr = concept_handle(sd15.clip, "a red cat")
    imgs = images(2)
    enc = [sd15.clip.encode_from_tokens_scheduled(sd15.clip.tokenize(t)) for t in ("a red cat", "a blue house")]
    both = [[torch.cat([enc[0][0][0], enc[1][0][0]]), dict(enc[0][0][1])]]
    with_p = detect(sd15, imgs, hgr, positive=both)
    first = detect(sd15, imgs[:1], hgr, positive=enc[0])
    second = detect(sd15, imgs[1:], hgr, positive=enc[1])
    torch.testing.assert_close(with_p.scores, torch.cat([first.scores, second.scores]), rtol=1e-4, atol=1e-6)
    # the prompt equal to the concept is redirected more than an unrelated one
    assert with_p.scores[0] > with_p.scores[1]
    wrong = [[torch.cat([enc[0][0][0]] * 3), dict(enc[0][0][1])]]
    with pytest.raises(ValueError, match="HGRHarmDetector: the positive conditioning has batch 3"):
        detect(sd15, imgs, hgr, positive=wrong)


def test_sdxl_family_and_learned_hgr(sdxl, tmp_path):
    net = hgr_net.HGRNet(hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off the identity
    learned = hgr_net.LearnedHGR(net, latent_format="SDXL")
    handle = hgr_type.HGRHandle(learned, name="t", latent_format="SDXL", latent_channels=4)
    det = detect(sdxl, images(3), handle, threshold=1e-9)
    assert det.scores.shape == (3,) and bool(det.flags.all())
    wrong = hgr_type.HGRHandle(learned, name="t", latent_format="SD15", latent_channels=4)
    with pytest.raises(ValueError, match="HGRHarmDetector: HGR 't' was trained for the SD15"):
        detect(sdxl, images(1), wrong)


def test_auto_noise_levels_are_the_ones_the_threshold_was_calibrated_at(sd15, tmp_path):
    """noise_levels 0 (auto) uses the levels recorded with the HGR file's calibrated threshold, so the
    auto threshold is applied to scores made as calibration made them; a file without them (or with an
    unusable value) gets 4; a number given on the node wins."""
    from safecfg_pack.safecfg import hgr_file

    net = hgr_net.HGRNet(hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16))
    learned = hgr_net.LearnedHGR(net, latent_format="SD15")
    loaded = {}
    for name, detection in (("six", {"threshold": 0.2, "levels": 6}), ("none", {"threshold": 0.2}),
                            ("bad", {"threshold": 0.2, "levels": 99})):
        path = hgr_file.save_hgr(tmp_path / f"{name}.safetensors", learned, base_model="tiny", detection=detection)
        loaded[name] = hgr_file.load_hgr(path, latent_format="SD15", latent_channels=4)
    assert [loaded[k].detect_levels for k in ("six", "none", "bad")] == [6, None, None]

    def levels(hgr, n):
        return detect(sd15, images(2), hgr_type.handle_for(hgr, "h"), levels=n).per_level.shape[1]

    assert levels(loaded["six"], 0) == 6 and levels(loaded["none"], 0) == 4 and levels(loaded["bad"], 0) == 4
    assert levels(loaded["six"], 2) == 2
    # saved again without an explicit detection block, the levels travel with the threshold
    again = hgr_file.load_hgr(hgr_file.save_hgr(tmp_path / "again.safetensors", loaded["six"], base_model="tiny"),
                              latent_format="SD15", latent_channels=4)
    assert (again.detect_threshold, again.detect_levels) == (0.2, 6)


def test_out_of_memory_falls_back_to_smaller_batches(sd15):
    """A model call larger than a budget raises the real torch.OutOfMemoryError; the detector retries
    in halves and gives the same scores."""
    hgr = concept_handle(sd15.clip)
    imgs = images(6)
    ref = detect(sd15, imgs, hgr, batch_size=6)
    model = sd15.model
    uncond = sd15.clip.encode_from_tokens_scheduled(sd15.clip.tokenize(""))
    inner = detect_nodes.make_predict(model, uncond, None, list(hgr.concept_conds), 6, "HGRHarmDetector")
    calls = []

    def limited(x, s, rows):
        calls.append(x.shape[0])
        if x.shape[0] > 6:  # 3 levels x 2 images
            raise torch.OutOfMemoryError("CUDA out of memory (simulated budget)")
        return inner(x, s, rows)

    z = model.model.process_latent_in(sd15.vae.encode(imgs[..., :3]).float())
    ms = model.get_model_object("model_sampling")
    sig = [float(ms.percent_to_sigma(p)) for p in detect_core.level_percents(3)]
    model.pre_run()
    try:
        det = detect_core.detect(hgr.redirector, z, sig, limited, with_prompt=False, threshold=0.5, batch_images=6,
                                noise_scaling=lambda s, n, x0: ms.noise_scaling(s, n, x0))
    finally:
        model.cleanup()
    assert calls == [18, 9] + [3] * 6  # 6 images, then 3, then one at a time
    torch.testing.assert_close(det.scores, ref.scores, rtol=1e-4, atol=1e-6)


def test_empty_batch_and_bad_images(sd15):
    hgr = concept_handle(sd15.clip)
    det = detect(sd15, torch.zeros(0, 64, 64, 3), hgr)
    assert det.scores.shape == (0,) and det.flags.shape == (0,)
    with pytest.raises(ValueError, match="HGRHarmDetector: expected an IMAGE batch"):
        detect(sd15, torch.zeros(64, 64, 3), hgr)
    with pytest.raises(ValueError, match="at least 8x8"):
        detect(sd15, torch.zeros(1, 4, 4, 3), hgr)


def _detection(flags):
    f = torch.tensor(flags, dtype=torch.bool)
    return detect_core.Detection(f.float(), f.float()[:, None], f, 0.5, False, ["t"])


@pytest.mark.parametrize("action", ["pass and flag", "blur", "pixelate", "black", "replace"])
def test_filter_actions_keep_order_and_partition(action):
    filt = runtime.get_node("HGRHarmFilter")
    imgs = images(4)
    rep = torch.full((1, 32, 48, 3), 0.25)
    det = _detection([False, True, False, True])
    # call the core (the node's UI preview needs the executor; the graph test covers it)
    out = detect_core.apply_action(imgs, det.flags, action, strength=4, replacement=rep)
    assert out.shape == imgs.shape
    assert torch.equal(out[0], imgs[0]) and torch.equal(out[2], imgs[2])  # unflagged untouched
    if action == "pass and flag":
        assert torch.equal(out, imgs)
    elif action == "black":
        assert float(out[1].abs().max()) == 0.0
    elif action == "replace":
        assert torch.allclose(out[3], torch.full_like(out[3], 0.25))
    else:
        assert not torch.equal(out[1], imgs[1])
        assert float(out[1].std()) < float(imgs[1].std())  # detail removed
    assert filt is not None


def test_filter_node_errors_name_the_fix():
    filt = runtime.get_node("HGRHarmFilter")
    with pytest.raises(ValueError, match="covers 2 image.*3 were given"):
        filt.execute(images=images(3), detection=_detection([True, False]), action="blur", strength=4)
    with pytest.raises(ValueError, match="'replace' needs an image"):
        filt.execute(images=images(2), detection=_detection([True, False]), action="replace", strength=4)


def test_detect_and_filter_graph_through_the_executor(run_prompt, pack):
    """txt2img -> detector -> filter through ComfyUI's executor: every image keeps its place, the
    UI data carries scores and flags, safe + flagged partition the batch."""
    prompt = txt2img_prompt(batch_size=3, output="PreviewImage")
    prompt["10"] = {"class_type": "HGRConceptRedirector", "inputs": {
        "clip": ["1", 1], "concepts": "a red cat", "threshold": -1.0, "push": 0.0, "mode": "global"}}
    prompt["11"] = {"class_type": "HGRHarmDetector", "inputs": {
        "images": ["6", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "hgr": ["10", 0],
        "threshold": 1e-6, "noise_levels": 2, "seed": 0, "batch_size": 2}}
    prompt["12"] = {"class_type": "HGRHarmFilter", "inputs": {
        "images": ["6", 0], "detection": ["11", 0], "action": "pixelate", "strength": 8}}
    prompt["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 1]}}
    prompt["14"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 2]}}
    out = run_prompt(prompt)
    det_ui = out["11"]
    assert len(det_ui["hgr_scores"]) == 3 and len(det_ui["images"]) == 3
    assert all(isinstance(s, float) and s > 0 for s in det_ui["hgr_scores"])
    flags = det_ui["hgr_flags"]
    assert flags == [True, True, True]  # a threshold of 1e-6 flags every image the concept touches
    assert out["12"]["hgr_flags"] == flags and len(out["12"]["images"]) == 3
    assert len(out["14"]["images"]) == 3 and len(out.get("13", {}).get("images", [])) == 0


def _smooth_images(n, side=64):
    """Images with shapes in them (a bright square each), so that a blur measurably changes them."""
    imgs = torch.full((n, side, side, 3), 0.1)
    for i in range(n):
        imgs[i, 8 + 4 * i:40 + 4 * i, 16:48, i % 3] = 0.9
    return imgs


def _png(entry):
    import folder_paths
    import numpy as np
    from PIL import Image

    filename, subfolder, kind = (entry["filename"], entry["subfolder"], entry["type"]) if isinstance(entry, dict) \
        else entry
    assert kind == "temp"
    path = f"{folder_paths.get_temp_directory()}/{subfolder}/{filename}"
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def test_blur_is_the_windowed_mean_at_any_radius():
    """The preview blur (running sums) equals three passes of the plain (2r+1)^2 windowed mean with
    replicated edges, on a non-square image, for radii below and above the image's size."""
    import torch.nn.functional as F

    blur = detect_core.blur
    img = torch.rand(13, 21, 3, generator=torch.Generator().manual_seed(0))
    for r in (1, 4, 30):
        x = img.permute(2, 0, 1).unsqueeze(0).double()
        for _ in range(3):
            x = F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)
        want = x[0].permute(1, 2, 0).float()
        got = blur(img, r)
        assert got.shape == img.shape and got.dtype == img.dtype
        assert (got - want).abs().max() < 1e-6, r
    assert (blur(img, 4) - img).abs().mean() > 0.05  # it does blur


@pytest.mark.parametrize("node", ["detector", "filter"])
def test_previews_of_flagged_images_are_blurred_on_the_server_and_revealable(node):
    """Every renderer, the queue and the assets panel show the preview files: flagged ones are blurred
    in the file itself; the sharp one is saved beside it and named only under hgr_reveal."""
    imgs = _smooth_images(3)
    det = _detection([True, False, True])
    if node == "detector":
        shown = imgs
        ui = detect_nodes.preview_ui(imgs, det, None)
    else:  # the filter previews what its IMAGE output holds (here: unchanged, 'pass and flag')
        out = runtime.get_node("HGRHarmFilter").execute(images=imgs, detection=det, action="pass and flag",
                                                        strength=4)
        shown, ui = out.result[0], out.ui
    assert len(ui["images"]) == 3 and ui["hgr_flags"] == [True, False, True]
    previews = [_png(e) for e in ui["images"]]
    reveal = ui["hgr_reveal"]
    assert reveal[1] is None and reveal[0] is not None and reveal[2] is not None
    if node == "filter":  # an action that hides flagged images offers nothing to reveal
        hidden = runtime.get_node("HGRHarmFilter").execute(images=imgs, detection=det, action="blur", strength=4)
        assert hidden.ui["hgr_reveal"] == [None, None, None] and hidden.ui["hgr_action"] == ["blur"]
        assert len(hidden.ui["images"]) == 3 and hidden.ui["hgr_flags"] == [True, False, True]
    for i in range(3):
        err = float((previews[i] - shown[i]).abs().max())
        if i == 1:
            assert err <= 1 / 255 + 1e-6  # a clean image's preview is the image (8-bit PNG)
        else:
            assert err > 0.3, f"flagged image {i} is not blurred in its preview file"
            # the blur keeps the colours, not the square's edges
            assert float(previews[i].diff(dim=0).abs().max()) < 0.1
            sharp = _png(reveal[i])
            assert float((sharp - shown[i]).abs().max()) <= 1 / 255 + 1e-6
    # no reveal entry has the shape of an image entry (front ends list those as outputs)
    assert not any(isinstance(r, dict) for r in reveal)


def test_filter_on_an_empty_batch_blocks_only_its_empty_outputs():
    from comfy_execution.graph_utils import ExecutionBlocker

    filt = runtime.get_node("HGRHarmFilter")
    empty = torch.zeros(0, 64, 64, 3)
    out = filt.execute(images=empty, detection=_detection([]), action="blur", strength=4)
    assert out.result[0].shape == (0, 64, 64, 3)
    assert isinstance(out.result[1], ExecutionBlocker) and isinstance(out.result[2], ExecutionBlocker)
    assert out.result[3] == "" and out.ui["hgr_scores"] == []
