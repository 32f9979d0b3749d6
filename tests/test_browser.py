"""Every workflow in workflows/ through the real front end in headless Chromium, in two front ends
(the pinned ``comfyui-frontend-package`` and the newest one the registry serves, installed by the
bootstrap) and in both node renderers (the classic canvas and "Nodes 2.0"): it loads with no missing
nodes, the front end's own graph-to-prompt converts it, and it runs to success on a real server (the
toy model in place of a user's checkpoint). Where a workflow has the detector or the filter, what
the page shows is checked in its pixels: every flagged preview is blurred, every clean one is sharp,
and the node's "reveal" button shows the flagged image sharp. Screenshots go to the test's
temporary folder."""

from __future__ import annotations

import io
import json
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools import browser
from devtools.server import comfy_server

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if not p.name.endswith(".api.json"))
FRONT_ENDS = {"pinned": None, "newest": browser.NEWEST_FRONT_END}
CONFIGS = [(fe, renderer) for fe in FRONT_ENDS for renderer in ("classic", "nodes2")]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"{fe}-{r}" for fe, r in CONFIGS])
def page_and_server(request):
    fe, renderer = request.param
    args = browser.front_end_args(FRONT_ENDS[fe])
    with comfy_server(extra_args=args) as server, \
            browser.front_end(server.url, vue_nodes=renderer == "nodes2") as page:
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
        if fe == "newest":
            assert version == FRONT_ENDS[fe].name, f"the server serves front end {version}"
        yield page, server, renderer


def test_there_are_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"sd15_safecfg_guider", "sd15_ksampler_safecfg_patch", "toy_detect_and_filter", "toy_train_hgr",
            "toy_demo", "toy_safe_finetune", "sd35_ksampler_safecfg_patch", "flux_dev_ksampler_safecfg_patch",
            "qwen_image_ksampler_safecfg_patch", "wan21_t2v_ksampler_safecfg_patch"} <= names
    for p in WORKFLOWS:
        assert p.with_suffix(".png").is_file(), f"{p.name} has no preview PNG"


def _view(server, entry) -> np.ndarray:
    """An image the server shows at /view (a preview file or a reveal file), float (H, W, 3)."""
    if isinstance(entry, dict):
        entry = [entry["filename"], entry["subfolder"], entry["type"]]
    q = urllib.parse.urlencode({"filename": entry[0], "subfolder": entry[1], "type": entry[2]})
    return np.asarray(Image.open(io.BytesIO(server.get("/view?" + q))).convert("RGB"), dtype=np.float32) / 255.0


def _coarse(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 4 * 4, a.shape[1] // 4 * 4
    return a[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))


def _like(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two images are at a quarter of their size (robust to a pixel of offset)."""
    return float(np.abs(_coarse(a) - _coarse(b)).mean())


def _detail(a: np.ndarray) -> float:
    """Mean absolute difference of neighbouring pixels: what a blur takes away."""
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def check_pixels(page, server, outputs: dict) -> int:
    """Every preview of every detector/filter node as the page shows it; returns how many flagged
    images were checked blurred against their sharp original."""
    strong = 0
    for node_id, out in outputs.items():
        if "hgr_flags" not in out:
            continue
        node_id = int(node_id)
        browser.show_node(page, node_id)
        for i, flagged in enumerate(out["hgr_flags"]):
            preview = _view(server, out["images"][i])
            size = (preview.shape[1], preview.shape[0])
            shown = browser.shown_image(page, browser.preview_rect(page, node_id, i), size)
            what = f"node {node_id}, image {i} ({'flagged' if flagged else 'clean'})"
            assert _like(shown, preview) < 0.06, f"{what}: the page does not show this node's preview"
            if not flagged:
                assert out["hgr_reveal"][i] is None
                assert _detail(shown) > 0.6 * _detail(preview), f"{what}: a clean preview is shown blurred"
                continue
            if out["hgr_reveal"][i] is None:  # the filter with an action that hides: nothing to reveal
                continue
            sharp = _view(server, out["hgr_reveal"][i])
            if _detail(sharp) > 2 * _detail(preview):  # the original has detail that the blur removed
                assert _detail(shown) < 0.3 * _detail(sharp), f"{what}: shown sharp in the page"
                assert _like(shown, sharp) > _like(shown, preview), what
                strong += 1
            revealed = browser.shown_image(page, browser.reveal(page, node_id, i), size)
            assert _like(revealed, sharp) < 0.06, f"{what}: 'reveal' does not show the original"
            assert _detail(revealed) > 0.6 * _detail(sharp), f"{what}: the revealed image is blurred"
    return strong


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_the_front_end(path, page_and_server, tmp_path_factory):
    page, server, renderer = page_and_server
    wf = json.loads(path.read_text())
    family = ((wf.get("extra") or {}).get("safecfg") or {}).get("family")
    if family:
        from devtools.tiny_nodes import models as tiny

        if family not in tiny.tiny_families():
            pytest.skip(f"this ComfyUI cannot build the tiny {family} (0.3.52 has no TAEHV and no Z-Image "
                        "encoder); make test's 0.3.75 runs it")
    assert "nodes" in wf and "links" in wf, "workflows/ holds UI-format workflows"
    shot = tmp_path_factory.mktemp("screens") / f"{path.stem}-{renderer}.png"
    res = browser.run_workflow(page, server, wf, path.stem, screenshot=shot)
    assert res["missing"] == [], f"{path.name}: the front end does not know {res['missing']}"
    assert res["history"]["status"]["status_str"] == "success"
    assert browser.is_vue(page) == (renderer == "nodes2"), "the page does not use the renderer asked for"
    assert shot.is_file() and shot.stat().st_size > 10_000
    if ((wf.get("extra") or {}).get("safecfg") or {}).get("family"):  # a family workflow: its stock loaders
        assert res["replaced"] == sum(n["type"] in browser.FAMILY_LOADERS for n in wf["nodes"]) >= 2
    else:
        uses_ckpt = any(n["type"] == "CheckpointLoaderSimple" for n in wf["nodes"])
        assert res["replaced"] == int(uses_ckpt)
    outputs = res["history"]["outputs"]
    if any(n["type"] in ("HGRHarmDetector", "HGRHarmFilter") for n in wf["nodes"]):
        reports = browser.reports(page)
        scored = {k: o for k, o in outputs.items() if "hgr_scores" in o}
        assert scored and set(reports) == set(scored), (reports, list(scored))
        for node_id, o in scored.items():
            rep = reports[node_id]
            n, flagged = len(o["hgr_flags"]), sum(o["hgr_flags"])
            assert rep["summary"].startswith(f"{flagged}/{n} flagged"), rep
            assert rep["flags"] == o["hgr_flags"] and len(rep["scores"]) == n
            revealable = sum(1 for f, r in zip(o["hgr_flags"], o["hgr_reveal"]) if f and r)
            assert revealable == (flagged if o.get("hgr_action", ["pass and flag"])[0] == "pass and flag" else 0)
            assert rep["buttons"] == revealable, "one reveal button per revealable flagged image"
        if any(any(o["hgr_flags"]) for o in scored.values()):
            assert check_pixels(page, server, scored) > 0, "no flagged image was checked against its original"
        else:
            check_pixels(page, server, scored)
    trains = {"HGRTrain": ("hgr", "hgr_cache"), "HGRSafeFinetune": ("loras", "lora_state")}
    for node_type, (folder, state) in trains.items():
        if not any(n["type"] == node_type for n in wf["nodes"]):
            continue
        written = [p.name for p in (server.base_dir / "models" / folder).iterdir()]
        assert written and all(n.endswith(".safetensors") for n in written), written  # nothing else there
        assert any((server.base_dir / "user" / "safecfg" / state).iterdir()), "no resumable state kept"
        # the loaders' lists, as the front end gets them: the new file, the toy files under toyworld/,
        # and no cache or state folder
        info = server.object_info("HGRLoader" if folder == "hgr" else "LoraLoaderModelOnly")
        (spec,) = info.values()
        key = "hgr_name" if folder == "hgr" else "lora_name"
        options = spec["input"]["required"][key][0]
        options = options if isinstance(options, list) else spec["input"]["required"][key][1]["options"]
        assert set(written) <= set(options), (written, options)
        assert not [o for o in options if "cache" in o or "state" in o or o.split("/")[-1].startswith(".")]
        assert [o for o in options if o.startswith("toyworld/")]
    assert not [e for e in page.errors if "SafeCFG" in e or "safecfg" in e], page.errors
