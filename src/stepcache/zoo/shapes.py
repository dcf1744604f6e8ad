"""The shapes world: coloured shapes on black that a CPU model can learn and a program can judge.

Images are 32x32 with one or two filled shapes (circle, square, triangle apex up; bounding box
9-15 px; never touching each other or the border) in seven exact colours. Videos are 8 such
frames with one shape moving 2 px per frame. Captions name colour, shape and, for two objects,
a relation between their bounding-box centres ("a red circle on the left of a blue square");
for video, the direction ("a yellow triangle moving right").

Everything is deterministic by seed. A fixed set of colour-shape combinations never appears in
training (``HELD_OUT_OBJECTS``), nor does a fixed tenth of the two-object and video captions:
those are the compositional held-out split. :func:`judge` reads an image (or video) and says,
criterion by criterion, whether it shows its caption.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

SIZE = 32
FRAMES = 8
STEP_PX = 2  # video motion per frame
MIN_SIDE, MAX_SIDE = 9, 15
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("on the left of", "on the right of", "above", "below")
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
# Never drawn in training, in any caption kind: the model knows each colour and each shape,
# never these pairings.
HELD_OUT_OBJECTS = (("cyan", "triangle"), ("magenta", "square"), ("white", "circle"))
HELD_OUT_FRACTION = 0.1  # of the two-object and video captions built from seen objects
# A relation must hold by at least this many pixels between centres in generated data, so
# that the caption is unambiguous to the eye and to the judge.
RELATION_MARGIN = 4.0


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one or two objects, a relation (two objects) or a direction (video)."""

    objects: tuple[Obj, ...]
    relation: str | None = None
    direction: str | None = None

    @property
    def kind(self) -> str:
        if self.direction is not None:
            return "video"
        return "single" if len(self.objects) == 1 else "pair"

    def __str__(self) -> str:
        if self.direction is not None:
            return f"{self.objects[0]} moving {self.direction}"
        if self.relation is not None:
            return f"{self.objects[0]} {self.relation} {self.objects[1]}"
        return str(self.objects[0])


_OBJ = r"a (\w+) (\w+)"
_PAIR = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")
_VIDEO = re.compile(rf"^{_OBJ} moving ({'|'.join(DIRECTIONS)})$")
_SINGLE = re.compile(rf"^{_OBJ}$")


def _obj(colour: str, shape: str, text: str) -> Obj:
    if colour not in COLOURS:
        raise ValueError(f"caption {text!r}: unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"caption {text!r}: unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    return Obj(colour, shape)


def parse(text: str) -> Caption:
    """The caption ``text`` as a :class:`Caption` (ValueError naming what does not fit the world)."""
    t = " ".join(str(text).lower().split())
    if m := _PAIR.match(t):
        a, b = _obj(m[1], m[2], text), _obj(m[4], m[5], text)
        if a == b:
            raise ValueError(f"caption {text!r}: the two objects must differ in colour or shape")
        return Caption((a, b), relation=m[3])
    if m := _VIDEO.match(t):
        return Caption((_obj(m[1], m[2], text),), direction=m[3])
    if m := _SINGLE.match(t):
        return Caption((_obj(m[1], m[2], text),))
    raise ValueError(
        f"caption {text!r} is not of the shapes world: 'a red circle', "
        "'a red circle on the left of a blue square' (or 'on the right of', 'above', 'below'), "
        "'a red circle moving right' (or 'left', 'up', 'down')"
    )


def _all_objects() -> list[Obj]:
    return [Obj(c, s) for c in COLOURS for s in SHAPES]


def _held_by_hash(text: str) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < HELD_OUT_FRACTION


def _is_held_out(cap: Caption) -> bool:
    if any((o.colour, o.shape) in HELD_OUT_OBJECTS for o in cap.objects):
        return True
    return cap.kind != "single" and _held_by_hash(str(cap))


@cache
def captions(kind: str, split: str = "train") -> tuple[str, ...]:
    """Every caption of ``kind`` ("single", "pair", "video") in ``split`` ("train" or "held_out")."""
    if kind not in ("single", "pair", "video") or split not in ("train", "held_out"):
        raise ValueError(f"kind must be single/pair/video and split train/held_out, got {kind!r}, {split!r}")
    objs = _all_objects()
    if kind == "single":
        caps = [Caption((o,)) for o in objs]
    elif kind == "pair":
        caps = [Caption((a, b), relation=r) for a in objs for b in objs if a != b for r in RELATIONS]
    else:
        caps = [Caption((o,), direction=d) for o in objs for d in DIRECTIONS]
    want = split == "held_out"
    return tuple(str(c) for c in caps if _is_held_out(c) == want)


# ---------------------------------------------------------------- drawing


def _mask(shape: str, w: int, h: int) -> np.ndarray:
    """Filled ``shape`` in a w x h box, judged at pixel centres."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1.0
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(xs - w / 2) <= (ys / h) * (w / 2) + 1e-9
    raise ValueError(f"unknown shape {shape!r}")


def _paint(canvas: np.ndarray, obj: Obj, x0: int, y0: int, side: int) -> None:
    m = _mask(obj.shape, side, side)
    canvas[y0 : y0 + side, x0 : x0 + side][m] = COLOURS[obj.colour]


def _centre(x0: int, y0: int, side: int) -> tuple[float, float]:
    return x0 + side / 2, y0 + side / 2


def _relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downward
    return {
        "on the left of": dx > margin,
        "on the right of": -dx > margin,
        "above": dy > margin,
        "below": -dy > margin,
    }[rel]


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Boxes (x0, y0, side) with at least one clear pixel between them (no touching)."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz < bx or bx + bsz < ax or ay + asz < by or by + bsz < ay


def _place(rng: np.random.Generator, side: int, span: int = 0) -> int:
    """A top-left coordinate that keeps a ``side`` box (moving ``span`` px) a pixel off the border."""
    return int(rng.integers(1, SIZE - side - span, endpoint=False))


def draw(caption: str | Caption, seed: int) -> np.ndarray:
    """The image (32, 32, 3) uint8, or video (8, 32, 32, 3), of ``caption``; deterministic by seed."""
    cap = parse(caption) if isinstance(caption, str) else caption
    rng = np.random.default_rng(seed)
    if cap.kind == "video":
        return _draw_video(cap, rng)
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    if cap.kind == "single":
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        _paint(canvas, cap.objects[0], _place(rng, side), _place(rng, side), side)
        return canvas
    for _attempt in range(10_000):
        boxes = []
        for _ in cap.objects:
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            boxes.append((_place(rng, side), _place(rng, side), side))
        if _apart(boxes[0], boxes[1]) and _relation_holds(
            cap.relation or "", _centre(*boxes[0]), _centre(*boxes[1]), RELATION_MARGIN
        ):
            for obj, box in zip(cap.objects, boxes, strict=True):
                _paint(canvas, obj, *box)
            return canvas
    raise RuntimeError(f"could not place {cap}")  # never: most draws fit


def _draw_video(cap: Caption, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    dx, dy = DIRECTIONS[cap.direction or "right"]
    travel = STEP_PX * (FRAMES - 1)
    x0 = _place(rng, side, travel if dx else 0) + (travel if dx < 0 else 0)
    y0 = _place(rng, side, travel if dy else 0) + (travel if dy < 0 else 0)
    video = np.zeros((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for f in range(FRAMES):
        _paint(video[f], cap.objects[0], x0 + dx * STEP_PX * f, y0 + dy * STEP_PX * f, side)
    return video


def dataset(
    kinds: dict[str, float], count: int, seed: int, split: str = "train"
) -> tuple[np.ndarray, list[str]]:
    """``count`` drawings (uint8) and their captions, kinds mixed by the weights in ``kinds``."""
    rng = np.random.default_rng(seed)
    names = list(kinds)
    weights = np.array([kinds[k] for k in names], dtype=np.float64)
    picks = rng.choice(len(names), size=count, p=weights / weights.sum())
    texts: list[str] = []
    images = []
    for i, k in enumerate(picks):
        pool = captions(names[k], split)
        text = pool[int(rng.integers(len(pool)))]
        texts.append(text)
        images.append(draw(text, seed * 1_000_003 + i))
    return np.stack(images), texts


def eval_captions(seeds: list[int], video: bool, split: str = "train") -> list[str]:
    """A caption per seed for benchmarks and searches: for images, even seeds a single object and
    odd seeds a pair; picked by seed, so calibration and evaluation seeds get different captions."""
    out = []
    for s in seeds:
        kind = "video" if video else ("single" if s % 2 == 0 else "pair")
        pool = captions(kind, split)
        digest = hashlib.sha256(f"{kind}:{s}".encode()).digest()
        out.append(pool[int.from_bytes(digest[:8], "little") % len(pool)])
    return out


# ---------------------------------------------------------------- judging

FOREGROUND = 0.3  # a pixel whose brightest channel is above this (of 1.0) is part of an object
MIN_AREA = 12  # smaller blobs are noise (the smallest shape, a 9 px triangle, covers ~40 px)
MIN_FIT = 0.6  # IoU with the best shape template below which a blob is no shape at all
MIN_MOTION = 0.75  # px per frame along the stated axis


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    centre: tuple[float, float]
    area: int


def _to_unit(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255.0


def blobs(image: np.ndarray) -> list[Blob]:
    """The objects an image (H, W, 3) in [0, 1] or uint8 shows, largest first."""
    from scipy import ndimage

    img = _to_unit(image)
    fg = img.max(axis=-1) > FOREGROUND
    labels, n = ndimage.label(fg)
    found = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        area = int(m.sum())
        if area < MIN_AREA:
            continue
        mean = img[sl][m].mean(axis=0)
        colour = list(COLOURS)[int(np.argmin(((_PALETTE - mean) ** 2).sum(axis=1)))]
        h, w = m.shape
        fits = {s: _iou(m, _mask(s, w, h)) for s in SHAPES}
        best = max(fits, key=lambda s: fits[s])
        shape = best if fits[best] >= MIN_FIT else "unknown"
        centre = (sl[1].start + w / 2, sl[0].start + h / 2)
        found.append(Blob(colour, shape, centre, area))
    return sorted(found, key=lambda b: -b.area)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _matches(blob: Blob, obj: Obj) -> tuple[bool, bool]:
    return blob.colour == obj.colour, blob.shape == obj.shape


def judge(caption: str | Caption, image: np.ndarray) -> dict[str, bool]:
    """Whether ``image`` (or video, frames first) shows ``caption``, criterion by criterion.

    Keys: ``count``, ``colour``, ``shape``, ``relation`` (pairs), ``direction`` (video) and
    ``all``. Colour and shape need every named object to be found; for two objects the best
    assignment of blobs to names is taken.
    """
    cap = parse(caption) if isinstance(caption, str) else caption
    if cap.kind == "video":
        return _judge_video(cap, np.asarray(image))
    found = blobs(image)
    verdict = {"count": len(found) == len(cap.objects)}
    if cap.kind == "single":
        colour, shape = _matches(found[0], cap.objects[0]) if found else (False, False)
        verdict |= {"colour": colour, "shape": shape}
    else:
        verdict |= _judge_pair(cap, found)
    verdict["all"] = all(verdict.values())
    return verdict


def _judge_pair(cap: Caption, found: list[Blob]) -> dict[str, bool]:
    best = {"colour": False, "shape": False, "relation": False}
    if len(found) < 2:
        return best
    a, b = cap.objects
    for x, y in ((found[0], found[1]), (found[1], found[0])):
        (ca, sa), (cb, sb) = _matches(x, a), _matches(y, b)
        cand = {
            "colour": ca and cb,
            "shape": sa and sb,
            "relation": _relation_holds(cap.relation or "", x.centre, y.centre, 0.0),
        }
        if sum(cand.values()) > sum(best.values()):
            best = cand
    return best


def _judge_video(cap: Caption, video: np.ndarray) -> dict[str, bool]:
    if video.ndim != 4:
        raise ValueError(f"a video caption needs frames (F, H, W, 3), got shape {video.shape}")
    per_frame = [blobs(f) for f in video]
    single = [f[0] for f in per_frame if len(f) == 1]
    obj = cap.objects[0]
    verdict = {
        "count": len(single) == len(per_frame),
        "colour": _majority([b.colour == obj.colour for b in single], len(per_frame)),
        "shape": _majority([b.shape == obj.shape for b in single], len(per_frame)),
        "direction": _moves(cap.direction or "", per_frame),
    }
    verdict["all"] = all(verdict.values())
    return verdict


def _majority(hits: list[bool], frames: int) -> bool:
    return sum(hits) * 2 > frames


def _moves(direction: str, per_frame: list[list[Blob]]) -> bool:
    """The largest blob's centre moves along ``direction`` (least-squares slope, px per frame)."""
    pts = [(t, f[0].centre) for t, f in enumerate(per_frame) if f]
    if len(pts) < 2:
        return False
    t = np.array([p[0] for p in pts], dtype=np.float64)
    xy = np.array([p[1] for p in pts], dtype=np.float64)
    slope = np.polyfit(t, xy, 1)[0]  # (vx, vy)
    want = np.array(DIRECTIONS[direction], dtype=np.float64)
    along = float(slope @ want)
    across = float(abs(slope @ want[::-1]))
    return along >= MIN_MOTION and along > 2 * across


def accuracy(captions_: list[str], images: np.ndarray) -> dict[str, float]:
    """Mean of each criterion over ``images`` judged against ``captions_``."""
    if len(captions_) != len(images):
        raise ValueError(f"{len(captions_)} captions for {len(images)} images")
    rows = [judge(c, im) for c, im in zip(captions_, images, strict=True)]
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
