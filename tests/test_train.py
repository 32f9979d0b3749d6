"""HGR training on the real runtime: teacher cache from a tiny model's own trajectories, fitting,
resumable shards and a validated file."""

from __future__ import annotations

from pathlib import Path

import folder_paths
import pytest
import torch

from devtools import comfy as runtime
from safecfg_pack.nodes.teacher import ComfyTeacher
from safecfg_pack.safecfg import hgr_file, hgr_net, train


def _data():
    return train, train.PromptData(harmful=["a red knife", "a blue knife", "a skull", "a green skull"],
                                   safe=["a red spoon", "a blue spoon", "a ball", "a green ball"],
                                   categories=["weapon", "weapon", "gore", "gore"],
                                   clean=["a red cat", "a blue house", "a tree", "a green field"])


def test_cache_fit_and_file_on_tiny_sd15(sd15, tmp_path):
    train, data = _data()
    teacher = ComfyTeacher(sd15.model, sd15.clip)
    spec = train.CacheSpec(states_per_trajectory=2, noised_per_image=1, steps=4, batch=4, seed=1)
    calls = []
    paths = train.build_cache(teacher, data, tmp_path / "cache", spec, progress=lambda d, t: calls.append(d))
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    cache = train.load_cache(tmp_path / "cache")
    n = 8 * 3  # 8 prompts x (2 trajectory states + 1 noised image)
    assert cache["g"].shape == (n, 4, 8, 8) and int(cache["harmful"].sum()) == 12
    clean = ~cache["harmful"].bool()
    assert torch.equal(cache["g"][clean], cache["target"][clean])  # clean target = identity
    assert not torch.allclose(cache["g"][~clean], cache["target"][~clean])
    # resuming keeps the shards that exist
    mtimes = [p.stat().st_mtime_ns for p in paths]
    train.build_cache(teacher, data, tmp_path / "cache", spec)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # an edited prompt file: the shards whose prompts changed are rebuilt, the others kept
    edited = train.PromptData(harmful=data.harmful, safe=data.safe, categories=data.categories,
                              clean=data.clean[:-1] + ["a yellow boat"])
    train.build_cache(teacher, edited, tmp_path / "cache", spec)
    changed = [p.stat().st_mtime_ns != m for p, m in zip(paths, mtimes)]
    assert any(changed) and not all(changed)
    train.build_cache(teacher, data, tmp_path / "cache", spec)  # back to the original prompts
    mtimes = [p.stat().st_mtime_ns for p in paths]
    cfg = hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16)
    hgr, summary = train.fit(cache, cfg, train.FitSpec(steps=60, batch=8, eval_every=20, lr=3e-3),
                             latent_format=teacher.latent_format, categories=data.category_names)
    assert summary["best_val"] < summary["identity_val_harmful"] + 1.0
    g, t, u, s = cache["g"], cache["target"], cache["uncond"], cache["sigma"]
    with torch.no_grad():
        r = g + hgr.delta(g, s, u)
    h = cache["harmful"].bool()
    err_fit = ((r - t)[h].flatten(1).norm(dim=1) / t[h].flatten(1).norm(dim=1)).mean()
    err_id = ((g - t)[h].flatten(1).norm(dim=1) / t[h].flatten(1).norm(dim=1)).mean()
    assert err_fit < err_id  # the fitted HGR moves harmful guidance towards the safe rewrite's
    out = tmp_path / "trained.safetensors"
    hgr_file.save_hgr(out, hgr, training=summary)
    back = hgr_file.load_hgr(out, latent_format="SD15", latent_channels=4)
    assert back.categories == ["gore", "weapon"]


def test_sharded_cache_builds_disjoint_units(sd15, tmp_path):
    train, data = _data()
    teacher = ComfyTeacher(sd15.model, sd15.clip)
    spec = train.CacheSpec(states_per_trajectory=1, noised_per_image=0, steps=2, batch=2, seed=0)
    a = train.build_cache(teacher, data, tmp_path / "c", spec, shard=0, num_shards=2)
    b = train.build_cache(teacher, data, tmp_path / "c", spec, shard=1, num_shards=2)
    assert len(a) == len(b) == 2 and not ({p.name for p in a} & {p.name for p in b})
    assert train.load_cache(tmp_path / "c")["g"].shape[0] == 8


def _train_graph(tmp_path, pairs: list[dict], family: str = "sd15", **inputs):
    """A prompt-pair file with ``pairs`` (clean prompts: a red cat, a tree), ``tmp_path/hgr`` as the
    default HGR folder, and a graph training an HGR on the tiny SD1.5 model: (graph, data, folder)."""
    import json

    import folder_paths

    data = tmp_path / "pairs.json"
    data.write_text(json.dumps({"pairs": pairs, "clean": ["a red cat", "a tree"]}))
    out_dir = tmp_path / "hgr"
    out_dir.mkdir()
    folder_paths.add_model_folder_path("hgr", str(out_dir), is_default=True)
    g = {"1": {"class_type": "SafeCFGTestTinyModel", "inputs": {"family": family, "seed": 0}},
         "2": {"class_type": "HGRTrain", "inputs": {"model": ["1", 0], "clip": ["1", 1], "data": str(data),
                                                    "image_size": 64, "seed": 0, **inputs}}}
    return g, data, out_dir


def test_hgr_train_node_writes_a_loadable_file(tmp_path, run_prompt):
    g, data, out_dir = _train_graph(tmp_path, [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
                                               {"harmful": "a skull", "safe": "a ball", "category": "gore"}],
                                    filename="tiny_test", fit_steps=20)
    out = run_prompt(g)
    assert "tiny_test.safetensors" in out["2"]["text"][0]
    f = out_dir / "tiny_test.safetensors"
    hgr = hgr_file.load_hgr(f, latent_format="SD15", latent_channels=4)
    assert hgr.categories == ["gore", "weapon"]
    # the cache lives in ComfyUI's user folder, never in a model folder
    assert (Path(folder_paths.get_user_directory()) / "safecfg" / "hgr_cache" / "tiny_test").is_dir()
    assert [p.name for p in out_dir.iterdir()] == ["tiny_test.safetensors"]
    # the file records the model it was trained for
    assert hgr.trained_for["arch"] and len(hgr.trained_for["probe"]) > 8 and hgr.trained_for["name"] == "SD15"
    assert not hgr.trained_for["toy"]
    bad = dict(g)
    bad["2"] = {**g["2"], "inputs": {**g["2"]["inputs"], "data": str(tmp_path / "missing.json")}}
    import pytest

    with pytest.raises(runtime.PromptExecutionError, match="HGRTrain: cannot read prompt data"):
        run_prompt(bad)


def test_hgr_train_node_on_tiny_flux_both_kinds(tmp_path, run_prompt):
    """HGRTrain on a flow-matching family (a tiny Flux with its own T5 + CLIP-L encoders, 16-channel
    latents): the latent kind writes a 16-channel Flux file, the text kind a file of the sequence layout
    for Flux's T5 (256 tokens); each loads for Flux and is refused for SD3."""
    import pytest

    pairs = [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
             {"harmful": "a skull", "safe": "a ball", "category": "gore"}]
    g, _, out_dir = _train_graph(tmp_path, pairs, family="flux", filename="flux_latent", fit_steps=10)
    run_prompt(g)
    latent = hgr_file.load_hgr(out_dir / "flux_latent.safetensors", latent_format="Flux", latent_channels=16)
    assert latent.config.latent_channels == 16 and latent.trained_for["name"] == "Flux"
    with pytest.raises(ValueError, match="Flux"):
        hgr_file.load_hgr(out_dir / "flux_latent.safetensors", latent_format="SD3", latent_channels=16)
    g["2"]["inputs"].update(filename="flux_text", kind="text", fit_steps=10)
    out = run_prompt(g)
    assert "text HGR" in out["2"]["text"][0]
    text = hgr_file.load_hgr(out_dir / "flux_text.safetensors", family="Flux")
    assert (text.kind, text.config.layout, text.config.empty_length, text.config.embed_dim) == ("text", 1, 256, 64)
    with pytest.raises(ValueError, match=r"trained for the 'Flux' text encoder but the model is 'SD3'"):
        hgr_file.load_hgr(out_dir / "flux_text.safetensors", family="SD3")


@pytest.mark.parametrize("family", ["sd3", "chroma", "qwen_image", "lumina2", "z_image", "hidream", "wan21"])
def test_hgr_train_node_trains_both_kinds_on_every_flow_matching_family(family, tmp_path, run_prompt):
    """HGRTrain, latent and text kind, on the tiny model of each flow-matching family (with its own text
    encoder where one is built tiny, else one of its widths standing in: see ``tiny_family``): each file
    loads for that family (latent family, 16 channels; text: the sequence layout) and records it."""
    from devtools.tiny_nodes import models as tiny

    if family not in tiny.tiny_families():
        pytest.skip(f"this ComfyUI cannot build the tiny {family}: no such model class, or no module its stand-in "
                    "encoder or VAE needs (0.3.52); make test's 0.3.75 builds every family")
    cls = tiny.DIT_FAMILIES[family]["cls"]
    pairs = [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
             {"harmful": "a skull on a table", "safe": "a ball", "category": "gore"}]
    g, _, out_dir = _train_graph(tmp_path, pairs, family=family, filename="latent", fit_steps=10)
    run_prompt(g)
    model = tiny.tiny_dit(family, 0)
    fmt = type(model.model.latent_format).__name__
    latent = hgr_file.load_hgr(out_dir / "latent.safetensors", latent_format=fmt, latent_channels=16)
    assert latent.trained_for["name"] == cls
    g["2"]["inputs"].update(filename="text", kind="text", fit_steps=10)
    run_prompt(g)
    text = hgr_file.load_hgr(out_dir / "text.safetensors", family=cls)
    assert (text.kind, text.config.layout, text.family) == ("text", 1, cls)


def test_hgr_train_node_on_tiny_wan_video_clips(tmp_path, run_prompt):
    """HGRTrain (latent kind) on a video model: the teacher samples clips (a tiny Wan 2.1, 3 latent frames
    of 8x8), the HGR is fitted frame by frame, and the file records the Wan latent family, 16 channels
    and the clips' 3 latent frames; the patch applies it to a clip of another length."""
    import nodes

    from devtools.tiny_nodes import models as tiny
    from safecfg_pack.nodes import guidance_nodes, hgr_type

    if "wan21" not in tiny.tiny_families():
        pytest.skip("this ComfyUI has no TAEHV or no Z-Image encoder (0.3.52); make test's 0.3.75 has both")

    pairs = [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
             {"harmful": "a skull", "safe": "a ball", "category": "gore"}]
    g, _, out_dir = _train_graph(tmp_path, pairs, family="wan21", filename="wan_latent", fit_steps=10, frames=3)
    run_prompt(g)
    f = out_dir / "wan_latent.safetensors"
    hgr = hgr_file.load_hgr(f, latent_format="Wan21", latent_channels=16)
    assert hgr.latent_frames == 3 and hgr_file.read_header(f)[1]["latent_frames"] == "3"
    m = tiny.tiny_dit("wan21", 0)
    (patched,) = guidance_nodes.HGRSafeCFGPatch.execute(model=m, hgr=hgr_type.handle_for(hgr, f.name), strength=1.0,
                                                        start_percent=0.0, end_percent=1.0).result
    pos, neg = tiny.dit_conditioning("wan21", 1), tiny.dit_conditioning("wan21", 2)
    lat = {"samples": torch.zeros(1, 16, 5, 8, 8)}  # 5 latent frames: another clip length than trained on

    def sample(model):
        return nodes.common_ksampler(model, 0, 3, 5.0, "euler", "simple", pos, neg, lat)[0]["samples"]

    out, ref = sample(patched), sample(m)
    assert out.shape == (1, 16, 5, 8, 8) and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_training_end_to_end_on_tiny_sdxl(sdxl, tmp_path):
    """The SDXL family (two text encoders, pooled output, size conditioning) trains and saves too."""
    train, data = _data()
    teacher = ComfyTeacher(sdxl.model, sdxl.clip)
    assert teacher.latent_format == "SDXL"
    spec = train.CacheSpec(states_per_trajectory=1, noised_per_image=1, steps=3, batch=8, seed=2)
    train.build_cache(teacher, data, tmp_path / "cache", spec)
    cache = train.load_cache(tmp_path / "cache")
    assert cache["g"].shape == (16, 4, 8, 8) and torch.isfinite(cache["target"]).all()
    h = cache["harmful"].bool()
    assert not torch.allclose(cache["g"][h], cache["target"][h])
    cfg = hgr_net.HGRConfig(width=16, mults=[1, 2], embed_dim=16)
    hgr, summary = train.fit(cache, cfg, train.FitSpec(steps=40, batch=8, eval_every=20, lr=3e-3),
                             latent_format=teacher.latent_format, categories=data.category_names)
    out = tmp_path / "sdxl.safetensors"
    hgr_file.save_hgr(out, hgr, training=summary)
    back = hgr_file.load_hgr(out, latent_format="SDXL", latent_channels=4)
    assert back.latent_format == "SDXL"
    for a, b in zip(hgr.net.state_dict().values(), back.net.state_dict().values()):
        assert torch.equal(a, b)
    try:
        hgr_file.load_hgr(out, latent_format="SD15", latent_channels=4)
    except hgr_file.HGRFileError as e:
        assert "SDXL" in str(e)
    else:
        raise AssertionError("an SDXL HGR loaded for an SD1.5 model")


def test_hgr_train_node_trains_the_text_kind_and_keeps_the_denoiser_frozen(tmp_path, run_prompt):
    """kind 'text': the paper's HGR, trained from the graph; its states are cached next to the file
    (a second run reuses them)."""
    g, _, out_dir = _train_graph(tmp_path, [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
                                            {"harmful": "a skull and a star", "safe": "a ball and a star",
                                             "category": "gore"}],
                                 filename="tiny_text", fit_steps=12, kind="text")
    out = run_prompt(g)
    assert "text HGR" in out["2"]["text"][0]
    f = out_dir / "tiny_text.safetensors"
    hgr = hgr_file.load_hgr(f)
    assert hgr.kind == "text" and hgr.family == "SD15" and hgr.categories == ["gore", "weapon"]
    states = Path(folder_paths.get_user_directory()) / "safecfg" / "hgr_cache" / "tiny_text" / \
        "text_states.safetensors"
    stamp = states.stat().st_mtime_ns
    run_prompt({**g, "2": {**g["2"], "inputs": {**g["2"]["inputs"], "fit_steps": 11}}})
    assert states.stat().st_mtime_ns == stamp  # the cached states were reused
    assert not hgr_file.load_hgr(f).rewrites
    # with rewrite_steps the file also holds a rewriter, its gate rising, and says so
    out = run_prompt({**g, "2": {**g["2"], "inputs": {**g["2"]["inputs"], "fit_steps": 11, "rewrite_steps": 20}}})
    assert "rewriter 20 steps" in out["2"]["text"][0]
    rw = hgr_file.load_hgr(f)
    assert rw.rewrites and float(rw.net.rewrite_gate[0]) < float(rw.net.rewrite_gate[1])
    assert states.stat().st_mtime_ns == stamp
