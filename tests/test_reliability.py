"""Reliability: no network and no stray writes, cancel mid-run, fuzzed node inputs, and a queue of
50 mixed prompts through a real server (bit-identical to running each alone, bounded memory growth)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import comfy.model_management
import nodes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools import comfy as runtime
from devtools.graphs import txt2img_prompt
from safecfg_pack.nodes import detect_nodes

REPO = Path(__file__).resolve().parents[1]


def _concept(clip, text="a red cat"):
    return runtime.get_node("HGRConceptRedirector").execute(clip=clip, concepts=text, threshold=-1.0, push=0.0,
                                                            mode="global").result[0]


def _patch(model, hgr, strength=1.0, start=0.0, end=1.0):
    return runtime.get_node("HGRSafeCFGPatch").execute(model=model, hgr=hgr, strength=strength, start_percent=start,
                                                       end_percent=end).result[0]


def _enc(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _ksample(model, pos, neg, steps=4, seed=0, batch=1, side=8):
    lat = {"samples": torch.zeros(batch, 4, side, side)}
    return nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", pos, neg, lat)[0]["samples"]


# ------------------------------------------------------------------------------------------------
# no network, no writes outside ComfyUI's output/models/temp folders

SANDBOX = textwrap.dedent('''
    import json, os, socket, sys
    calls = []
    def refuse(*a, **k):
        calls.append(repr(a[:2]))
        raise OSError("network blocked by the test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    writes = []
    def audit(event, args):
        if event == "open" and len(args) > 1 and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            w = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if w:
                writes.append(os.fsdecode(args[0]))
    sys.addaudithook(audit)
    from devtools import comfy as runtime
    from devtools.graphs import txt2img_prompt
    runtime.start(cpu=True, test_nodes=True)
    g = txt2img_prompt(batch_size=2, output="SaveImage")
    g["10"] = {"class_type": "HGRConceptRedirector", "inputs": {"clip": ["1", 1], "concepts": "a red cat",
               "threshold": -1.0, "push": 0.0, "mode": "global"}}
    g["11"] = {"class_type": "HGRSafeCFGPatch", "inputs": {"model": ["1", 0], "hgr": ["10", 0], "strength": 1.0,
               "start_percent": 0.0, "end_percent": 1.0}}
    g["5"]["inputs"]["model"] = ["11", 0]
    g["12"] = {"class_type": "HGRHarmDetector", "inputs": {"images": ["6", 0], "model": ["1", 0], "clip": ["1", 1],
               "vae": ["1", 2], "hgr": ["10", 0], "threshold": 0.0, "noise_levels": 2, "seed": 0, "batch_size": 4}}
    g["13"] = {"class_type": "HGRHarmFilter", "inputs": {"images": ["6", 0], "detection": ["12", 0],
               "action": "blur", "strength": 4}}
    runtime.run_prompt(g)
    print("RESULT " + json.dumps({"net": calls, "writes": writes, "work": str(runtime.work_dir())}))
''')


def test_no_network_and_no_writes_outside_comfy_folders(tmp_path):
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO)}  # the development layer, as pytest's pythonpath gives it to the tests
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["net"] == [], f"network access attempted: {res['net']}"
    work = Path(res["work"]).resolve()
    allowed = [work / "output", work / "temp", work / "models", work / "input", work / "user", tmp_path.resolve()]
    stray = [w for w in res["writes"] if w not in ("/dev/null",) and not any(
        Path(w).resolve().is_relative_to(a) for a in allowed)]
    assert stray == [], f"writes outside ComfyUI's folders: {stray}"
    assert any("output" in w for w in res["writes"])  # the SaveImage did write (the hook sees writes)


# ------------------------------------------------------------------------------------------------
# cancel mid-run


def test_cancel_mid_run_leaves_nothing_behind(sd15):
    model, clip = sd15.model, sd15.clip
    pos, neg = _enc(clip, "a red cat"), _enc(clip, "")
    patched = _patch(model, _concept(clip))
    fresh = _ksample(_patch(model, _concept(clip)), pos, neg)
    calls = {"n": 0}

    def wrapper(apply_model, args):
        calls["n"] += 1
        if calls["n"] == 3:
            comfy.model_management.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    interrupted = patched.clone()
    interrupted.set_model_unet_function_wrapper(wrapper)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _ksample(interrupted, pos, neg)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert calls["n"] >= 3
    # the cancelled model holds no half-finished per-run state, and its next run equals a fresh one
    states = [v for k, v in interrupted.model_options.items() if str(k).startswith("safecfg_patch_")]
    assert states and all(not s.get("evaluating_concepts") and "concept_out" not in s for s in states)
    assert torch.equal(_ksample(interrupted, pos, neg), fresh)
    assert torch.equal(_ksample(patched, pos, neg), fresh)


# ------------------------------------------------------------------------------------------------
# fuzzed node inputs

FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def _unusual(clip, prompt, kind):
    """A conditioning of an unusual kind: area, mask, timestep range, or two combined."""
    import node_helpers

    c = _enc(clip, prompt)
    if kind == "area":
        return node_helpers.conditioning_set_values(c, {"area": (4, 4, 0, 0), "strength": 1.0,
                                                        "set_area_to_bounds": False})
    if kind == "mask":
        m = torch.zeros(1, 8, 8)
        m[:, :4] = 1.0
        return node_helpers.conditioning_set_values(c, {"mask": m, "set_area_to_bounds": False, "mask_strength": 1.0})
    if kind == "timestep_range":
        return node_helpers.conditioning_set_values(c, {"start_percent": 0.2, "end_percent": 0.7})
    if kind == "combined":
        return c + _enc(clip, "a blue house")
    return c


@FUZZ
@given(strength=st.floats(0.0, 1.0), start=st.floats(0.0, 1.0), end=st.floats(0.0, 1.0),
       batch=st.integers(1, 3), prompt=st.sampled_from(["", "a red cat", "!!", "a " * 60]),
       kind=st.sampled_from(["plain", "area", "mask", "timestep_range", "combined"]))
def test_fuzz_patch_inputs_give_finite_output(sd15_session, strength, start, end, batch, prompt, kind):
    model, clip = sd15_session
    pos = _unusual(clip, prompt, kind)
    out = _ksample(_patch(model, _concept(clip), strength, start, end), pos, _enc(clip, ""), steps=2, batch=batch)
    assert out.shape == (batch, 4, 8, 8) and torch.isfinite(out).all()
    if strength == 0.0 or start >= end:
        assert torch.equal(out, _ksample(model, pos, _enc(clip, ""), steps=2, batch=batch))


@FUZZ
@given(n=st.integers(0, 5), h=st.integers(8, 40), w=st.integers(8, 40), threshold=st.floats(0.0, 2.0),
       levels=st.integers(1, 3), batch_size=st.integers(1, 4),
       action=st.sampled_from(["pass and flag", "blur", "pixelate", "black", "replace"]), strength=st.integers(1, 64))
def test_fuzz_detector_and_filter(sd15_session, n, h, w, threshold, levels, batch_size, action, strength):
    """Any batch size (0 included), image sizes not divisible by 8, any threshold and action: no crash,
    every image kept in order, safe + flagged partition the batch."""
    model, clip = sd15_session
    vae = runtime_vae()
    imgs = torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(n * 1000 + h * 10 + w))
    det = detect_nodes.run_detection(imgs, model, clip, vae, _concept(clip), None, threshold, levels, 0, batch_size)
    assert det.scores.shape == (n,) and torch.isfinite(det.scores).all()
    filt = runtime.get_node("HGRHarmFilter")
    rep = torch.rand(1, 5, 7, 3)
    res = filt.execute(images=imgs, detection=det, action=action, strength=strength, replacement=rep).result
    assert res[0].shape == imgs.shape
    keep = ~det.flags
    assert torch.equal(res[0][keep], imgs[keep])
    n_safe = res[1].shape[0] if torch.is_tensor(res[1]) else 0
    n_flag = res[2].shape[0] if torch.is_tensor(res[2]) else 0
    assert n_safe + n_flag == n and n_flag == int(det.flags.sum())


_VAE = {}


def runtime_vae():
    if "vae" not in _VAE:
        from devtools.tiny_nodes import models as tiny_models

        _VAE["vae"] = tiny_models.tiny_vae(0)
    return _VAE["vae"]


@pytest.fixture(scope="module")
def sd15_session():
    from devtools.tiny_nodes import models as tiny_models

    return tiny_models.tiny_sd15(0), tiny_models.tiny_sd15_clip(0)


# ------------------------------------------------------------------------------------------------
# load: 50 queued prompts through a real server


def _graphs():
    base = txt2img_prompt(batch_size=1, output="SaveImage", steps=3)
    plain = json.loads(json.dumps(base))
    safe = json.loads(json.dumps(base))
    safe["10"] = {"class_type": "HGRConceptRedirector", "inputs": {"clip": ["1", 1], "concepts": "a red cat",
                                                                 "threshold": -1.0, "push": 0.0, "mode": "global"}}
    safe["11"] = {"class_type": "HGRSafeCFGPatch", "inputs": {"model": ["1", 0], "hgr": ["10", 0], "strength": 1.0,
                                                            "start_percent": 0.0, "end_percent": 1.0}}
    safe["5"]["inputs"]["model"] = ["11", 0]
    det = json.loads(json.dumps(safe))
    det["12"] = {"class_type": "HGRHarmDetector", "inputs": {"images": ["6", 0], "model": ["1", 0], "clip": ["1", 1],
                                                            "vae": ["1", 2], "hgr": ["10", 0], "threshold": 0.0,
                                                            "noise_levels": 2, "seed": 0, "batch_size": 4}}
    det["13"] = {"class_type": "HGRHarmFilter", "inputs": {"images": ["6", 0], "detection": ["12", 0],
                                                           "action": "pixelate", "strength": 4}}
    det["7"]["inputs"]["images"] = ["13", 0]
    return {"plain": plain, "safe": safe, "detect": det}


def _image(server, entry, node="7"):
    from PIL import Image

    info = entry["outputs"][node]["images"][0]
    data = server.get("/view?filename={}&subfolder={}&type={}".format(info["filename"], info["subfolder"],
                                                                         info["type"]))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


LOAD_RSS_BOUND_MIB = 300


def test_fifty_mixed_prompts_through_a_real_server(comfy_server):
    server = comfy_server
    graphs = _graphs()
    alone = {}
    for name, g in graphs.items():
        for seed in (1, 2):
            gg = json.loads(json.dumps(g))
            gg["5"]["inputs"]["seed"] = seed
            alone[(name, seed)] = _image(server, server.run(gg, timeout=120))
    rss0 = _rss_kib(server.proc.pid)
    ids = []
    for i in range(50):
        name = list(graphs)[i % 3]
        seed = 1 + (i // 3) % 2
        gg = json.loads(json.dumps(graphs[name]))
        gg["5"]["inputs"]["seed"] = seed
        gg["7"]["inputs"]["filename_prefix"] = f"load_{i}"
        ids.append((server.queue(gg), name, seed))
    for pid, name, seed in ids:
        entry = server.wait(pid, timeout=600)
        assert np.array_equal(_image(server, entry), alone[(name, seed)]), f"{name} seed {seed} differs"
    growth_mib = (_rss_kib(server.proc.pid) - rss0) / 1024
    print(f"server RSS growth over 50 prompts: {growth_mib:.1f} MiB")
    assert growth_mib < LOAD_RSS_BOUND_MIB
