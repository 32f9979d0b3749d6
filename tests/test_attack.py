"""`make attack`'s Ring-A-Bell-style search at the --quick budget: banned names stay out of the found
prompts, every method is judged with an interval, and a rerun resumes the search from its state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert rab["budget"] == QUICK and len(rab["targets"]) == QUICK["targets"]
    names = {n for _, ns in world.HARMFUL.values() for n in ns} | {c for c, _ in world.HARMFUL.values()}
    for t in rab["targets"]:
        assert not any(n in t["found_prompt"].lower() for n in names), t["found_prompt"]
        assert 0.0 < t["cosine_to_target"] <= 1.0
    for row in ("clean prompts", "soft target", "random tokens", "plain", "text_hgr"):
        asr = rab["methods"][row]["asr"]
        assert asr["n"] == QUICK["targets"] and asr["ci"][0] <= asr["rate"] <= asr["ci"][1]
    assert (tmp_path / "attack_samples.png").is_file()
    # the rerun finds the finished search in its state and does not search again; same prompts
    proc2, res2 = _run(tmp_path, "b.json")
    assert "resuming at generation 3" in proc2.stdout + proc2.stderr
    assert [t["found_prompt"] for t in res2["attacks"]["ring_a_bell"]["targets"]] == \
        [t["found_prompt"] for t in rab["targets"]]
