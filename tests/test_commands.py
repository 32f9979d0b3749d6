"""The command lines (``commands.train_hgr``, ``commands.safe_finetune``) on the tiny model of every
family, passed in as a host that runs ComfyUI in this process passes its models (``main(models=...)``):
every step after loading the files runs as on the command line (arguments, teacher cache, fit, the file
and its stamp). ComfyUI's file loaders themselves read full-size architectures only (its model
detection fixes Flux's heads, its text encoder configs fix their widths), so the tiny models cannot
come from files; the loading options are tested for what they refuse."""

from __future__ import annotations

import json

import pytest

from devtools.tiny_nodes import models as tiny

FAMILIES = ["sd15", "sdxl", *sorted(tiny.FAMILY_TEXT)]
PAIRS = [{"harmful": "a red knife", "safe": "a red spoon", "category": "weapon"},
         {"harmful": "a skull on a table", "safe": "a ball on a table", "category": "gore"}]


def _data(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps({"pairs": PAIRS, "clean": ["a red cat", "a tree"]}), encoding="utf-8")
    return data


def _models(family):
    if family not in ("sd15", "sdxl") and family not in tiny.tiny_families():
        pytest.skip(f"this ComfyUI cannot build the tiny {family}: no such model class, or no module its stand-in "
                    "encoder or VAE needs (0.3.52); make test's 0.3.75 builds every family")
    m, clip, _ = tiny.tiny_family(family, 0)
    return m, clip, f"tiny_{family}.safetensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_train_hgr_command_trains_both_kinds_for_every_family(family, tmp_path):
    """``python -m commands.train_hgr`` (both kinds, a short run) for each family's tiny model: each file
    loads for that family (latent: its latent format and channels; text: its config class and token
    layout) and records the model it was trained for under the name given."""
    from commands import train_hgr
    from safecfg_pack.nodes import hgr_type
    from safecfg_pack.safecfg import hgr_file

    m, clip, name = models = _models(family)
    data = _data(tmp_path)
    common = ["--data", str(data), "--size", "64", "--steps", "3", "--fit-steps", "4"]
    assert train_hgr.main([*common, "--out", str(tmp_path / "latent.safetensors")], models=models) == 0
    lf = m.model.latent_format
    latent = hgr_file.load_hgr(tmp_path / "latent.safetensors", latent_format=type(lf).__name__,
                               latent_channels=lf.latent_channels)
    assert latent.config.latent_channels == lf.latent_channels and latent.trained_for["name"] == name
    assert train_hgr.main([*common, "--kind", "text", "--out", str(tmp_path / "text.safetensors")],
                          models=models) == 0
    cls = hgr_type.model_family(m)
    text = hgr_file.load_hgr(tmp_path / "text.safetensors", family=cls)
    assert (text.kind, text.family, text.config.layout) == ("text", cls, hgr_type.text_layout(m))
    assert text.trained_for["name"] == name
    assert (tmp_path / "latent.cache").is_dir() and (tmp_path / "text.cache").is_dir()  # resumable caches


def test_safe_finetune_command_on_flux_with_an_hgr_the_train_command_wrote(tmp_path):
    """The chain a Flux user runs: ``commands.train_hgr`` writes a latent HGR for the model, then
    ``commands.safe_finetune`` trains a LoRA from an unlabelled pool with it (a short run); ComfyUI's own
    LoRA loader maps every key onto the model, and the file records the base model's name."""
    import comfy.sd
    from safetensors import safe_open
    from safetensors.torch import load_file

    from commands import safe_finetune, train_hgr

    models = _models("flux")
    hgr = tmp_path / "flux_hgr.safetensors"
    assert train_hgr.main(["--data", str(_data(tmp_path)), "--size", "64", "--steps", "3", "--fit-steps", "4",
                           "--out", str(hgr)], models=models) == 0
    pool = tmp_path / "pool.txt"
    pool.write_text("a red knife\na cat\na skull on a table\na blue house\n", encoding="utf-8")
    lora = tmp_path / "flux_safe_lora.safetensors"
    assert safe_finetune.main(["--hgr", str(hgr), "--prompts", str(pool), "--out", str(lora), "--steps", "3",
                               "--states", "2", "--rank", "4", "--state", str(tmp_path / "state")],
                              models=models) == 0
    sd = load_file(str(lora))
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert downs
    patched, _ = comfy.sd.load_lora_for_models(models[0], None, sd, 1.0, 0.0)
    assert len(patched.patches) == len(downs)
    with safe_open(str(lora), "pt") as f:
        assert f.metadata().get("base_model") == models[2]


def test_model_options_are_checked_before_anything_loads(tmp_path, capsys):
    """What the command lines refuse, each naming the option and the fix: no model option; a diffusion
    model without its text encoders or CLIP type; text encoder options beside a checkpoint; a model
    option beside a model the host passed in; a missing file; an unknown CLIP type (the message lists
    this ComfyUI's types)."""
    from commands import common, train_hgr

    out = ["--out", str(tmp_path / "x.safetensors")]

    def refused(argv, models=None):
        with pytest.raises(SystemExit) as e:
            train_hgr.main(argv + out, models=models)
        return str(e.value.code) + capsys.readouterr().err

    assert "one of --toy, --checkpoint or --diffusion-model is required" in refused([])
    assert "--diffusion-model needs --text-encoder" in refused(["--diffusion-model", "flux1-dev.safetensors"])
    assert "--diffusion-model needs --text-encoder" in refused(["--diffusion-model", "m.safetensors",
                                                                "--text-encoder", "t5xxl.safetensors"])
    assert "go with --diffusion-model" in refused(["--checkpoint", "m.safetensors", "--clip-type", "flux"])
    assert "passed in by the host" in refused(["--toy"], models=(None, None, "x"))
    model, te = tmp_path / "model.safetensors", tmp_path / "te.safetensors"
    model.write_bytes(b"")
    missing = tmp_path / "t5xxl_fp16.safetensors"
    args = train_hgr.argparse.Namespace(toy=False, checkpoint=None, diffusion_model=str(model),
                                        text_encoder=[str(missing)], clip_type="flux")
    with pytest.raises(SystemExit, match=rf"{missing.name}: no such file"):
        common.load_model(args)
    te.write_bytes(b"")
    args.text_encoder, args.clip_type = [str(te)], "fluxx"
    with pytest.raises(SystemExit, match=r"--clip-type 'fluxx': not a type of this ComfyUI; one of .*flux.*sd3"):
        common.load_model(args)
    assert common.clip_type("FLUX").name == "FLUX"
