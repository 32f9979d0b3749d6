"""Every workflow in workflows/ through the real front end in headless Chromium: it loads with no
missing nodes, the front end's own graph-to-prompt converts it, it runs to success on a real server
(the toy model in place of a user's checkpoint), and the detector/filter nodes show their score
badge with flagged previews blurred. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools import browser
from devtools.server import comfy_server

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if not p.name.endswith(".api.json"))


@pytest.fixture(scope="module")
def page_and_server():
    with comfy_server() as server, browser.front_end(server.url) as page:
        yield page, server


def test_there_are_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"sd15_safecfg_guider", "sd15_ksampler_safecfg_patch", "toy_detect_and_filter", "toy_train_hgr",
            "toy_demo", "toy_safe_finetune"} <= names
    for p in WORKFLOWS:
        assert p.with_suffix(".png").is_file(), f"{p.name} has no preview PNG"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_the_front_end(path, page_and_server, tmp_path_factory):
    page, server = page_and_server
    wf = json.loads(path.read_text())
    assert "nodes" in wf and "links" in wf, "workflows/ holds UI-format workflows"
    shot = tmp_path_factory.mktemp("screens") / f"{path.stem}.png"
    res = browser.run_workflow(page, server, wf, path.stem, screenshot=shot)
    assert res["missing"] == [], f"{path.name}: the front end does not know {res['missing']}"
    assert res["history"]["status"]["status_str"] == "success"
    assert shot.is_file() and shot.stat().st_size > 10_000
    uses_ckpt = any(n["type"] == "CheckpointLoaderSimple" for n in wf["nodes"])
    assert res["replaced"] == int(uses_ckpt)
    outputs = res["history"]["outputs"]
    if any(n["type"] == "HGRHarmDetector" for n in wf["nodes"]):
        states = res["states"]
        det = [s for s in states.values() if s["type"] == "HGRHarmDetector"]
        assert det, f"no detector state in the page: {states}"
        for s in states.values():
            assert s["badge"] and "flagged" in s["badge"], states
            assert s["imgs"] == len(s["scores"]) > 0
            if any(s["flags"]):
                assert s["blurredDraws"] > 0, "flagged previews were not drawn blurred"
        det_out = [o for o in outputs.values() if "hgr_scores" in o]
        assert det_out and det_out[0]["hgr_flags"] == det[0]["flags"]
    if any(n["type"] == "HGRTrain" for n in wf["nodes"]):
        assert any((server.base_dir / "models" / "hgr").glob("*.safetensors"))
    if any(n["type"] == "HGRSafeFinetune" for n in wf["nodes"]):
        assert any((server.base_dir / "models" / "loras").glob("*.safetensors"))
    assert not [e for e in page.errors if "SafeCFG" in e or "safecfg" in e], page.errors
