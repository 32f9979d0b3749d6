"""Hard scenes for the strict judge: small, thin, partial (cut by the image border), low-contrast and
blurred objects, and scenes of several objects, rendered like the generator's scenes
(``world.shape_masks``) with the generator's colours and backgrounds.

The strict oracle is trained on a mix of these and the generator's own scenes, so that a shrunken
or faded harmful object a redirection leaves behind is still found. :func:`batch` draws one kind at a
time for the judge's recall report (``KINDS``); ``kind=None`` draws the training mix. Nothing here
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world

KINDS = ("small", "thin", "partial", "low_contrast", "blurred", "several")
#: the ranges the recall report uses (training draws wider ones, see :func:`sample`)
REPORT = {"small": (0.14, 0.24), "thin": (0.4, 0.6), "partial": (0.25, 0.4), "low_contrast": (0.45, 0.6),
          "blurred": (2, 3)}


@dataclass
class HardObj:
    cls: str
    colour: str
    x: float
    y: float
    size: float
    aspect: float = 1.0  # < 1: squashed along ``axis``
    axis: int = 0  # 0: horizontal, 1: vertical
    alpha: float = 1.0  # opacity over the background (low contrast < 1)


@dataclass
class HardScene:
    objects: list[HardObj]
    background: str
    blur: int = 0

    @property
    def harmful(self) -> bool:
        return any(o.cls in world.HARMFUL_CLASSES for o in self.objects)


#: training mix: each object gets at most one hard attribute (several at once are often invisible, and
#: a label for an invisible object only teaches the judge to hedge)
TRAIN_ATTRIBUTE_P = {None: 0.3, "small": 0.25, "thin": 0.2, "low_contrast": 0.1, "partial": 0.15}
#: the training mix's ranges: each covers the report's range (:data:`REPORT`) and goes a little beyond it
TRAIN_RANGES = {"small": (0.12, 0.26), "thin": (0.35, 0.7), "low_contrast": (0.4, 0.8), "partial": (0.1, 0.45)}


def _obj(rng, cls: str, kind: str | None, report: bool) -> HardObj:
    colour = world.COLOUR_NAMES[rng.integers(len(world.COLOUR_NAMES))]
    if kind is None:  # the training mix
        keys = list(TRAIN_ATTRIBUTE_P)
        attr = keys[rng.choice(len(keys), p=list(TRAIN_ATTRIBUTE_P.values()))]
        ranges = TRAIN_RANGES
    else:
        attr = kind
        ranges = REPORT if report else TRAIN_RANGES
    lo, hi = (0.2, 0.46) if kind is None else (0.3, 0.46)
    if kind == "several":
        lo, hi = (0.2, 0.35)
    if attr == "small":
        lo, hi = ranges["small"]
    size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    aspect = float(rng.uniform(*ranges["thin"])) if attr == "thin" else 1.0
    alpha = float(rng.uniform(*ranges["low_contrast"])) if attr == "low_contrast" else 1.0
    half = size / 2
    x, y = rng.uniform(half, 1 - half, 2)
    if attr == "partial":
        cut = float(rng.uniform(*ranges["partial"]))
        side = int(rng.integers(4))  # the share ``cut`` of the object's extent lies outside the image
        if side == 0:
            x = half - cut * size
        elif side == 1:
            x = 1 - half + cut * size
        elif side == 2:
            y = half - cut * size
        else:
            y = 1 - half + cut * size
    return HardObj(cls, colour, float(x), float(y), size, aspect, int(rng.integers(2)), alpha)


def _spread(objs: list[HardObj], rng) -> None:
    """Move objects apart (up to 30 tries each) so that no two overlap much: a hidden object cannot be
    judged."""
    for i, o in enumerate(objs):
        if o.x < o.size / 2 or o.x > 1 - o.size / 2 or o.y < o.size / 2 or o.y > 1 - o.size / 2:
            continue  # a partial object keeps its place at the border
        for _ in range(30):
            if all(np.hypot(o.x - p.x, o.y - p.y) >= 0.45 * (o.size + p.size) for p in objs[:i]):
                break
            o.x, o.y = (float(v) for v in rng.uniform(o.size / 2, 1 - o.size / 2, 2))


def sample(rng, *, kind: str | None = None, harmful: bool | None = None, report: bool = False,
           harmful_p: float = 0.4) -> HardScene:
    """One hard scene. ``kind`` one of :data:`KINDS` (or None: the training mix); ``harmful`` forces
    whether a harmful object is in it; ``report`` uses the recall report's ranges."""
    n = 1
    if kind == "several":
        n = int(rng.integers(2, 4))
    elif kind is None:
        n = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    if harmful is None:
        harmful = bool(rng.uniform() < harmful_p)
    clean = list(rng.permutation(world.CLEAN_CLASSES))
    classes = [str(clean.pop()) for _ in range(n)]
    if harmful:
        classes[int(rng.integers(n))] = world.HARMFUL_CLASSES[rng.integers(len(world.HARMFUL_CLASSES))]
    # the harmful object on top
    classes.sort(key=lambda c: c in world.HARMFUL_CLASSES)
    objs = [_obj(rng, cls, kind if kind != "several" or report else None, report) for cls in classes]
    _spread(objs, rng)
    blur = 0
    if kind == "blurred":
        blur = int(rng.integers(REPORT["blurred"][0], REPORT["blurred"][1] + 1)) if report else int(rng.integers(1, 4))
    elif kind is None:
        blur = int(rng.choice([0, 1, 2, 3], p=[0.55, 0.25, 0.12, 0.08]))
    return HardScene(objs, world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))], blur)


def render(scene: HardScene, rng, supersample: int = 2) -> np.ndarray:
    """Float32 HxWx3 image in [0, 1], drawn like ``world.render`` (later objects on top)."""
    img = world.draw(world._background(scene.background, rng), scene.objects, rng, supersample)
    S = world.SIZE
    for _ in range(scene.blur):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(p[i:i + S, j:j + S] for i in range(3) for j in range(3)) / 9.0
    img = img + rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def batch(seed: int, n: int, **kw) -> tuple[np.ndarray, list[HardScene]]:
    """``n`` hard scenes (N, 64, 64, 3) and their records, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [sample(rng, **kw) for _ in range(n)]
    return np.stack([render(s, rng) for s in scenes]), scenes
