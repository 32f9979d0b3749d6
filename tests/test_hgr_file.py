"""HGR weight files: round trip, metadata, and every way a file can be wrong."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from safecfg_pack.safecfg.hgr_file import HGRFileError, load_hgr, save_hgr
from safecfg_pack.safecfg.hgr_net import HGRConfig, HGRNet, LearnedHGR

SMALL = dict(width=16, mults=[1, 2], embed_dim=16)


def _hgr(seed=0, **cfg):
    torch.manual_seed(seed)
    net = HGRNet(HGRConfig(**{**SMALL, **cfg}))
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return LearnedHGR(net, latent_format="SD15", categories=["violence", "weapons"])


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    hgr = _hgr()
    p = save_hgr(tmp_path / "a.safetensors", hgr, base_model="tiny", training={"steps": 3})
    back = load_hgr(p, latent_format="SD15", latent_channels=4)
    assert back.categories == ["violence", "weapons"] and back.latent_format == "SD15"
    assert json.loads(back.metadata["training"]) == {"steps": 3}
    for (k, a), (_, b) in zip(hgr.net.state_dict().items(), back.net.state_dict().items()):
        assert torch.equal(a, b), k
    g, u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    s = torch.tensor([3.0])
    assert torch.equal(hgr.redirect(g, s, uncond=u).g_red, back.redirect(g, s, uncond=u).g_red)


def _expect(path, *words, **kw):
    with pytest.raises(HGRFileError) as e:
        load_hgr(path, **kw)
    msg = str(e.value)
    assert str(path.name) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "no such file", "models/hgr")


def test_not_safetensors_name(tmp_path):
    p = tmp_path / "x.ckpt"
    p.write_bytes(b"123")
    _expect(p, ".safetensors")


class _Payload:
    """Unpickling this creates a marker file: proof that code in a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_without_running_it(tmp_path):
    import pickle

    p = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, p)  # zip/pickle container
    _expect(p, "pickle")
    marker = tmp_path / "code-ran"
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(_Payload(marker)))  # a bare pickle with a code payload
    with pytest.raises(HGRFileError):
        load_hgr(raw)
    assert not marker.exists()


def test_malformed_metadata(tmp_path):
    hgr = _hgr()
    meta = {"format": "safecfg.hgr", "format_version": "1", "latent_channels": "4", "latent_format": "SD15",
            "arch": "{not json"}
    p = tmp_path / "badarch.safetensors"
    save_file({"w": torch.zeros(2)}, p, metadata=meta)
    _expect(p, "arch")
    meta["arch"] = hgr.config.to_json()
    meta["latent_channels"] = "x" * 2_000_000  # oversized metadata value
    p = tmp_path / "bigmeta.safetensors"
    save_file({"w": torch.zeros(2)}, p, metadata=meta)
    with pytest.raises(HGRFileError):
        load_hgr(p)


def test_truncated_and_bad_header(tmp_path):
    good = save_hgr(tmp_path / "good.safetensors", _hgr())
    data = good.read_bytes()
    t = tmp_path / "trunc.safetensors"
    t.write_bytes(data[: len(data) // 2])
    _expect(t, "truncated")
    h = tmp_path / "hdr.safetensors"
    h.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    _expect(h, "json")
    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    _expect(big, "limit")


def test_wrong_family_and_channels(tmp_path):
    p = save_hgr(tmp_path / "fam.safetensors", _hgr())
    _expect(p, "SDXL", "family", latent_format="SDXL")
    _expect(p, "16-channel" if False else "channel", latent_channels=16)


def test_missing_keys_and_wrong_shapes(tmp_path):
    hgr = _hgr()
    sd = {k: v.contiguous() for k, v in hgr.net.state_dict().items()}
    meta = {"format": "safecfg.hgr", "format_version": "1", "arch": hgr.config.to_json(),
            "latent_channels": "4", "latent_format": "SD15"}
    missing = dict(sd)
    missing.pop("conv_out.weight")
    p = tmp_path / "missing.safetensors"
    save_file(missing, p, metadata=meta)
    _expect(p, "missing", "conv_out.weight")
    shaped = dict(sd)
    shaped["conv_in.bias"] = torch.zeros(3)
    p = tmp_path / "shape.safetensors"
    save_file(shaped, p, metadata=meta)
    _expect(p, "conv_in.bias", "shape")
    nan = dict(sd)
    nan["conv_out.bias"] = torch.full_like(sd["conv_out.bias"], float("nan"))
    p = tmp_path / "nan.safetensors"
    save_file(nan, p, metadata=meta)
    _expect(p, "nan")
    ints = dict(sd)
    ints["conv_in.bias"] = torch.zeros(sd["conv_in.bias"].shape, dtype=torch.int32)
    p = tmp_path / "int.safetensors"
    save_file(ints, p, metadata=meta)
    _expect(p, "dtype")


def test_other_safetensors_and_hostile_metadata(tmp_path):
    p = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, p, metadata={"ss_network_module": "networks.lora"})
    _expect(p, "not an HGR file")
    hgr = _hgr()
    meta = {"format": "safecfg.hgr", "format_version": "1", "latent_channels": "4", "latent_format": "SD15",
            "arch": json.dumps({**json.loads(hgr.config.to_json()), "width": 100000})}
    p = tmp_path / "huge.safetensors"
    save_file({"w": torch.zeros(2)}, p, metadata=meta)
    _expect(p, "architecture")
    meta["arch"] = hgr.config.to_json()
    meta["format_version"] = "99"
    p = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, p, metadata=meta)
    _expect(p, "version")


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    p = save_hgr(tmp_path / "x.safetensors", _hgr())
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
