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


# ---------------------------------------------------------------------------------------------
# formless scenes: explicit negatives for the judge

#: a formless scene's blobs are softened by this many box blurs (``blurred`` objects: 1-3)
FORMLESS_BLUR = (1, 6)
#: a clean object blurred past recognition (as a harmful object the judge must not call it): box blurs
HEAVY_BLUR = (4, 7)


@dataclass
class Blob:
    """A smooth star-convex shape with no class: radius ``size / 2`` perturbed by a few low harmonics."""
    colour: str
    x: float
    y: float
    size: float
    harmonics: tuple  # ((amplitude, phase), ...) for k = 2, 3, ...
    aspect: float = 1.0
    angle: float = 0.0
    alpha: float = 1.0


@dataclass
class FormlessScene:
    """Blobs and possibly a clean object (``objects``: the labelled ones, clean only), blurred by ``blur``.
    ``supervise``: "all" (every class's presence is a label: the blobs show no class), or "harmful" (only
    the harmful classes are labels, absent: a clean object blurred past recognition is no longer clearly
    its class, but it is never a harmful one)."""
    blobs: list[Blob]
    objects: list[HardObj]
    background: str
    blur: int
    supervise: str = "all"

    harmful = False


def _blob(rng, slot: int | None = None) -> Blob:
    """A blob anywhere, or (``slot`` 0 or 1) near the left or right place of a generator's two-object
    scene, where a sampler that fails to draw two objects leaves two blobs."""
    colour = world.COLOUR_NAMES[rng.integers(len(world.COLOUR_NAMES))]
    size = float(np.exp(rng.uniform(np.log(0.18), np.log(0.5))))
    half = size / 2
    if slot is None:
        x, y = rng.uniform(half * 0.8, 1 - half * 0.8, 2)
    else:
        x, y = (0.3, 0.7)[slot] + rng.normal(0, 0.04), 0.5 + rng.normal(0, 0.05)
    harm = tuple((float(rng.uniform(0, 0.3 / k)), float(rng.uniform(0, 2 * np.pi))) for k in range(2, 6))
    return Blob(colour, float(x), float(y), size, harm, float(rng.uniform(0.55, 1.0)), float(rng.uniform(0, np.pi)),
                float(rng.uniform(0.6, 1.0)))


def _draw_blobs(img: np.ndarray, blobs: list[Blob], rng, supersample: int = 2) -> np.ndarray:
    n = world.SIZE * supersample
    ax = (np.arange(n) + 0.5) / n
    X, Y = np.meshgrid(ax, ax)
    for b in blobs:
        c, s = np.cos(b.angle), np.sin(b.angle)
        u, v = (X - b.x) / (b.size / 2), (Y - b.y) / (b.size / 2)
        u, v = c * u + s * v, (-s * u + c * v) / b.aspect
        r, th = np.hypot(u, v), np.arctan2(v, u)
        rad = 1.0 + sum(a * np.cos(k * th + p) for k, (a, p) in enumerate(b.harmonics, start=2))
        body = r < rad
        colour = np.array(world.COLOURS[b.colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
        a = body.reshape(world.SIZE, supersample, world.SIZE, supersample).mean(axis=(1, 3))[..., None] * b.alpha
        img = img * (1 - a) + np.clip(colour, 0, 1) * a
    return img.astype(np.float32)


def formless_sample(rng) -> FormlessScene:
    """One formless scene: one or two blobs (a lone blob often beside a recognisable clean object; two
    blobs often side by side, where the generator puts two objects), or a clean object blurred past
    recognition (a quarter of the scenes)."""
    bg = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
    if rng.uniform() < 0.25:
        clean = str(world.CLEAN_CLASSES[rng.integers(len(world.CLEAN_CLASSES))])
        obj = _obj(rng, clean, "several", False)
        obj.size = float(rng.uniform(0.3, 0.5))
        obj.x, obj.y = (float(v) for v in rng.uniform(obj.size / 2, 1 - obj.size / 2, 2))
        return FormlessScene([], [obj], bg, int(rng.integers(HEAVY_BLUR[0], HEAVY_BLUR[1] + 1)), "harmful")
    if rng.uniform() < 0.35:  # two blobs side by side
        blobs = [_blob(rng, 0), _blob(rng, 1)]
    else:
        blobs = [_blob(rng) for _ in range(int(rng.choice([1, 2], p=[0.6, 0.4])))]
    objs = []
    if len(blobs) == 1 and rng.uniform() < 0.6:
        clean = str(world.CLEAN_CLASSES[rng.integers(len(world.CLEAN_CLASSES))])
        objs = [_obj(rng, clean, "several", False)]
        _spread(objs, rng)
    blur = int(rng.integers(FORMLESS_BLUR[0], FORMLESS_BLUR[1] + 1))
    # a recognisable clean object keeps at most 3 blurs (the ``blurred`` kind's range); the blobs are
    # softened further on their own when the draw asks for more
    return FormlessScene(blobs, objs, bg, blur, "all")


def _box_blur(img: np.ndarray, passes: int) -> np.ndarray:
    S = world.SIZE
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(p[i:i + S, j:j + S] for i in range(3) for j in range(3)) / 9.0
    return img


def formless_render(scene: FormlessScene, rng) -> np.ndarray:
    bg = world._background(scene.background, rng)
    if scene.blobs:
        layer = _box_blur(_draw_blobs(bg.copy(), scene.blobs, rng), scene.blur)
        img = _box_blur(world.draw(layer, scene.objects, rng), min(scene.blur, 3) if scene.objects else 0)
    else:
        img = _box_blur(world.draw(bg, scene.objects, rng), scene.blur)
    img = img + rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def formless_batch(seed: int, n: int) -> tuple[np.ndarray, list[FormlessScene]]:
    """``n`` formless scenes (N, 64, 64, 3) and their records, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [formless_sample(rng) for _ in range(n)]
    return np.stack([formless_render(s, rng) for s in scenes]), scenes
