"""Prompt-pair data for training the toy world's HGRs: harmful prompts (training names and training
templates only, never the held-out ones) with safe rewrites, and clean prompts.

    python -m toyworld.hgr_data              # data/toyworld_hgr.json: one object per prompt
    python -m toyworld.hgr_data --composed   # data/toyworld_hgr_composed.json: also composed scenes

The composed file adds what the first lacks: a harmful object beside a clean one ("a red knife and a
large blue star on stripes"), whose safe rewrite changes only the harmful object ("a red spoon and a
large blue star on stripes"), two clean objects, and single objects with a position phrase, all in
the training templates (``toyworld.grammar.TRAIN_TEMPLATES``). No string of it is a benchmark prompt
or a calibration prompt: those are drawn first (``toyworld.eval.prompts``) and left out here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import grammar, world

SAFE_REWRITE = grammar.SAFE_REWRITE  # harmful object -> clean object of similar size
DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "toyworld_hgr.json"
OUT_COMPOSED = DATA / "toyworld_hgr_composed.json"


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


def _drop_colours(spec: grammar.Spec, rng, p: float = 0.2) -> grammar.Spec:
    """Leave out each object's colour with probability ``p`` (the generator's captions do too)."""
    items = tuple(replace(it, colour=None) if rng.uniform() < p else it for it in spec.items)
    return replace(spec, items=items)


def build_composed(seed: int = 12, n_composed: int = 480, n_positioned: int = 120, n_clean_pairs: int = 300,
                   exclude: set[str] | None = None) -> dict:
    """The single-object data of :func:`build` plus composed harmful scenes, single harmful objects
    with a position phrase, and clean pairs; strings in ``exclude`` (default: every benchmark and
    calibration prompt) are drawn again."""
    if exclude is None:
        from .eval.prompts import CALIBRATION_MAX, CALIBRATION_SPLITS, benchmark_strings, calibration_prompts

        exclude = benchmark_strings() | {s.text for split in CALIBRATION_SPLITS
                                         for s in calibration_prompts(split, CALIBRATION_MAX)}
    base = build()
    rng = np.random.default_rng(seed)
    seen = {p[k] for p in base["pairs"] for k in ("harmful", "safe")} | set(base["clean"])
    cats, clean_classes = list(world.HARMFUL), world.CLEAN_CLASSES

    def fresh(make, i):
        for _ in range(1000):
            spec = make(i)
            texts = {spec.text, spec.rewrite().text}
            if not texts & exclude and not texts & seen:
                seen.update(texts)
                return spec
        raise RuntimeError("cannot draw a training prompt clear of the benchmark")

    def harmful_pair(i):
        cat = cats[i % len(cats)]
        cls = world.HARMFUL[cat][0]
        other = clean_classes[rng.integers(len(clean_classes))]
        objs = [(cls, world.TRAIN_NAMES[cat]), (other, [other])]
        if rng.uniform() < 0.5:
            objs = objs[::-1]
        return _drop_colours(grammar.sample(rng, grammar.TRAIN_PAIR, objs, size_p=0.4, bg_p=0.6), rng)

    def positioned(i):
        cat = cats[i % len(cats)]
        spec = grammar.sample(rng, grammar.TRAIN_SINGLE, [(world.HARMFUL[cat][0], world.TRAIN_NAMES[cat])],
                              size_p=0.4, bg_p=0.6)
        return _drop_colours(replace(spec, position=list(world.POSITIONS)[rng.integers(len(world.POSITIONS))]), rng)

    def clean_pair(i):
        a = clean_classes[i % len(clean_classes)]
        b = [c for c in clean_classes if c != a][rng.integers(len(clean_classes) - 1)]
        return _drop_colours(grammar.sample(rng, grammar.TRAIN_PAIR, [(a, [a]), (b, [b])], size_p=0.4, bg_p=0.6),
                             rng)

    pairs = list(base["pairs"])
    for make, n in ((harmful_pair, n_composed), (positioned, n_positioned)):
        for i in range(n):
            spec = fresh(make, i)
            pairs.append({"harmful": spec.text, "safe": spec.rewrite().text, "category": spec.category})
    clean = list(base["clean"]) + [fresh(clean_pair, i).text for i in range(n_clean_pairs)]
    return {"about": "Toy-world HGR training data with composed scenes (toyworld/hgr_data.py --composed): "
                     "training templates and training names only; the safe rewrite changes only the harmful "
                     "object; no benchmark or calibration prompt string.", "pairs": pairs, "clean": clean}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--composed", action="store_true", help="also composed scenes -> data/toyworld_hgr_composed.json")
    args = ap.parse_args(argv)
    data, out = (build_composed(), OUT_COMPOSED) if args.composed else (build(), OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['pairs'])} pairs, {len(data['clean'])} clean prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
