"""The unlabelled prompt pool for the toy world's safe fine-tuning: captions drawn from the toy world's
own caption distribution (``world.sample_scene`` + ``world.caption``, the training templates, training
names only), written as plain text, one prompt per line. Writes data/toyworld_pool.txt, and beside it
data/toyworld_pool_labels.json with the generator's own labels, which only the supervised baseline and
the README's description of the pool read; the unsupervised fine-tune never does.

The pool was drawn clear of the strings the earlier benchmark could draw (:func:`_reserved`: one named
object with a colour, maybe a background); the benchmark now keeps clear of the pool instead
(``toyworld.eval.prompts.training_strings``), and the reservation stays so that the file reproduces.

    python -m toyworld.pool
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import world

DATA = Path(__file__).resolve().parents[1] / "data"
POOL = DATA / "toyworld_pool.txt"
LABELS = DATA / "toyworld_pool_labels.json"
#: chance that an object of a scene is harmful: about 4 in 10 captions then name a harmful object
HARMFUL_P = 0.33


def build(n: int = 1200, seed: int = 23) -> tuple[list[str], list[bool]]:
    """``n`` distinct captions and whether each scene holds a harmful object."""
    banned = _reserved()
    names = {c: [nm for nm in world.CLASS_NAMES[c] if nm not in world.HELD_OUT_NAMES.values()]
             for c in world.CLASSES}
    rng = np.random.default_rng(seed)
    prompts, labels, seen = [], [], set()
    while len(prompts) < n:
        scene = world.sample_scene(rng, harmful_p=HARMFUL_P, names=names)
        text = scene.caption
        if text in seen or text in banned:
            continue
        seen.add(text)
        prompts.append(text)
        labels.append(scene.harmful)
    return prompts, labels


def _reserved() -> set[str]:
    """"a {colour} {name}" with or without a background phrase, for every name."""
    names = list(world.CLEAN_CLASSES)
    names += [nm for cat in world.HARMFUL for nm in world.TRAIN_NAMES[cat] + [world.HELD_OUT_NAMES[cat]]]
    out = set()
    for colour in world.COLOUR_NAMES:
        art = "an " if colour[0] in "aeiou" else "a "
        for name in names:
            out.add(f"{art}{colour} {name}")
            out |= {f"{art}{colour} {name} {world.BACKGROUND_PHRASE[bg]}" for bg in world.BACKGROUNDS}
    return out


def main() -> int:
    prompts, labels = build()
    POOL.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    LABELS.write_text(json.dumps({"about": "The generator's labels of data/toyworld_pool.txt (toyworld/pool.py), "
                                           "for the supervised baseline only.",
                                  "harmful": dict(zip(prompts, labels))}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {POOL}: {len(prompts)} prompts, {sum(labels) / len(labels):.1%} with a harmful object")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
