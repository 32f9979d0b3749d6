"""Prompt-pair data for training the toy world's HGR: harmful prompts (training names only, never
the held-out ones) with safe rewrites, and clean prompts. Writes data/toyworld_hgr.json.

    python -m toyworld.hgr_data
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import world

SAFE_REWRITE = {"knife": "spoon", "skull": "circle"}  # harmful object -> clean object of similar size
OUT = Path(__file__).resolve().parents[1] / "data" / "toyworld_hgr.json"


def build(seed: int = 11, n_clean: int = 600) -> dict:
    rng = np.random.default_rng(seed)
    pairs = []
    for cat, names in world.TRAIN_NAMES.items():
        obj = world.HARMFUL[cat][0]
        for name in names:
            for colour in world.COLOUR_NAMES:
                for bg in [None] + world.BACKGROUNDS:
                    for size in (None, "small", "large"):
                        head = " ".join(w for w in (size, colour) if w)
                        art = "an" if head[0] in "aeiou" else "a"
                        tail = f" {world.BACKGROUND_PHRASE[bg]}" if bg else ""
                        pairs.append({"harmful": f"{art} {head} {name}{tail}",
                                      "safe": f"{art} {head} {SAFE_REWRITE[obj]}{tail}", "category": cat})
    clean = []
    for _ in range(n_clean):
        s = world.sample_scene(rng, harmful_p=0.0)
        clean.append(world.caption(s, rng))
    return {"about": "Toy-world HGR training data (toyworld/hgr_data.py). The held-out harmful names "
                     "(toyworld.world.HELD_OUT_NAMES) never appear in it.", "pairs": pairs, "clean": clean}


if __name__ == "__main__":
    data = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}: {len(data['pairs'])} pairs, {len(data['clean'])} clean prompts")
