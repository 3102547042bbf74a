"""The demo model's world: flat shapes drawn with Pillow, their captions, and classifiers that read them back.

The classifiers judge generated images with nothing learned: the background is the colour of the image's
border, the foreground is every pixel nearer the shape's colour than the background's, the colour is the
nearest palette entry. The shape: a star is the one concave shape, so a foreground that fills well under
its convex hull and fits the star's outline is a star; otherwise it is whichever convex outline (circle,
square, triangle) overlaps it best.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger and shrunk: anti-aliased edges, as a real image would have

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
}
NEUTRALS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
BACKGROUNDS = ("white", "black", "gray", "blue", "yellow", "green")
SHAPES = ("circle", "square", "triangle", "star")
ALL_COLOURS = {**COLOURS, **NEUTRALS}

# (weight, template): which parts of the description a caption names. Partial captions teach the words
# on their own ("red" alone, "a circle" without a colour), which negative prompts and CFG lean on.
CAPTIONS = (
    (0.55, "a {colour} {shape} on a {background} background"),
    (0.13, "a {colour} {shape}"),
    (0.10, "a {shape} on a {background} background"),
    (0.04, "a {shape}"),
    (0.04, "{colour}"),
    (0.04, "a {background} background"),
    (0.10, ""),  # caption dropout: the unconditional branch classifier-free guidance needs
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre and radius in pixels of the 64x64 image
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, *, backgrounds=BACKGROUNDS) -> Scene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([b for b in backgrounds if b != colour])
    r = rng.uniform(14, 21)
    jitter = 30 - r
    return Scene(rng.choice(SHAPES), colour, background,
                 SIZE / 2 + rng.uniform(-jitter, jitter) / 2, SIZE / 2 + rng.uniform(-jitter, jitter) / 2, r)


def random_caption(scene: Scene, rng: random.Random) -> str:
    weights, templates = zip(*CAPTIONS)
    template = rng.choices(templates, weights)[0]
    return template.format(colour=scene.colour, shape=scene.shape, background=scene.background)


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape (None for a circle), upright, inside the circle of radius r."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * 1.05 * math.sin(math.radians(a)) + r * 0.2)
                for a in (-90, 30, 150)]
    if shape == "star":
        points = []
        for i in range(10):
            rad = r * 1.1 if i % 2 == 0 else r * 0.48
            a = math.radians(-90 + 36 * i)
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.1))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, scale: float) -> None:
    poly = outline(shape, cx * scale, cy * scale, r * scale)
    if poly is None:
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = SIZE, *, colour: tuple[int, int, int] | None = None) -> Image.Image:
    """The scene as an RGB image (``colour`` overrides the shape's colour, for the LoRA's data set)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), ALL_COLOURS[scene.background])
    scale = big / SIZE
    _draw(ImageDraw.Draw(image), scene.shape, scene.cx, scene.cy, scene.r,
          colour or COLOURS[scene.colour], scale)
    return image.resize((size, size), Image.Resampling.BOX)


# ---- reading images back ----------------------------------------------------------------------------------


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float64)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = ((np.array([table[n] for n in names], np.float64) - rgb) ** 2).sum(axis=1)
    return names[int(d.argmin())]


@dataclass
class Reading:
    """What the classifiers see in one image."""

    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    shape_iou: float
    foreground_fraction: float
    foreground_rgb: tuple[float, float, float] | None


def foreground_mask(image) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mask, background RGB, foreground RGB): two-means split seeded by the border colour."""
    a = _rgb(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist_bg = np.sqrt(((a - bg) ** 2).sum(-1))
    mask = dist_bg > 60
    fg = None
    for _ in range(3):  # refine: each pixel goes to whichever of the two colours it is nearer
        if mask.sum() < 8:
            return np.zeros(a.shape[:2], bool), bg, None
        fg = np.median(a[mask], axis=0)
        mask = np.sqrt(((a - fg) ** 2).sum(-1)) < dist_bg
    return mask, bg, fg


def _template_mask(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The shape drawn so that its own bounding box fills ``box`` (x0, y0, x1, y1)."""
    poly = outline(shape, 0.0, 0.0, 1.0)
    xs, ys = ([-1.0, 1.0], [-1.0, 1.0]) if poly is None else zip(*poly)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    bx0, by0, bx1, by1 = box
    sx, sy = (bx1 - bx0) / (x1 - x0), (by1 - by0) / (y1 - y0)
    k = SUPERSAMPLE
    image = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(image)
    if poly is None:
        draw.ellipse([bx0 * k, by0 * k, bx1 * k, by1 * k], fill=255)
    else:
        draw.polygon([((bx0 + (x - x0) * sx) * k, (by0 + (y - y0) * sy) * k) for x, y in poly], fill=255)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX)) >= 128


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixels, each pixel a unit square."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    corners = np.unique(np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]), axis=0)
    # a 2-D hull's "volume" is its area; on integer corners it is a multiple of 1/2, so qhull's rounding goes
    return round(2 * ConvexHull(corners).volume) / 2


# A drawn star fills 52-60 % of its hull, a blurred or decoded one up to about 75 %; circles, squares and
# triangles, drawn or decoded, fill over 88 %.
STAR_SOLIDITY = 0.8
# A concave foreground must still fit the star's outline: not two blobs, not a triangle with sagging sides
# (IoU 0.51-0.54), where drawn stars fit at 0.73-0.78 and generated ones at 0.56-0.80.
STAR_MIN_IOU = 0.55


def drop_specks(mask: np.ndarray) -> np.ndarray:
    """The mask without connected pieces under 5 % of its largest piece: a generated image's stray specks
    would otherwise stretch the fitted templates and the hull (two real shapes both stay)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
    return np.isin(labels, keep)


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """(shape or None, the IoU of the template it was judged by).

    Templates are fitted to a 2 % trimmed bounding box, and the hull is taken within 2 px of it, so stray
    pixels neither stretch a template nor make a convex shape look concave."""
    mask = drop_specks(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) < 8:
        return None, 0.0
    lo, hi = 1, 99
    box = (np.percentile(xs, lo), np.percentile(ys, lo), np.percentile(xs, hi) + 1, np.percentile(ys, hi) + 1)

    def iou(shape: str) -> float:
        t = _template_mask(shape, box, mask.shape[0])
        return float((t & mask).sum() / max((t | mask).sum(), 1))

    # 2 px of slack: the trim cuts the tips of a star's points, and without them a star looks less concave
    x0, y0 = (max(int(v) - 2, 0) for v in box[:2])
    x1, y1 = (int(np.ceil(v)) + 2 for v in box[2:])
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    if inside.sum() / max(convex_hull_area(inside), 1.0) < STAR_SOLIDITY:
        star = iou("star")
        return ("star", star) if star >= STAR_MIN_IOU else (None, star)
    scores = {shape: iou(shape) for shape in SHAPES if shape != "star"}
    best = max(scores, key=scores.get)
    return best, scores[best]


def read_image(image) -> Reading:
    mask, bg, fg = foreground_mask(image)
    background = _nearest(bg, ALL_COLOURS)
    if fg is None:
        return Reading(background, None, None, 0.0, 0.0, None)
    shape, iou = classify_shape(mask)
    return Reading(background, _nearest(fg, COLOURS), shape, iou, float(mask.mean()), tuple(float(v) for v in fg))


def redness(image) -> float:
    """Mean over all pixels of how much red exceeds the other two channels, in 0-1 units."""
    a = _rgb(image) / 255.0
    return float((a[..., 0] - (a[..., 1] + a[..., 2]) / 2).mean())


def colour_affinity(image, colour: str) -> float:
    """Fraction of the image's pixels nearer ``colour`` than any other palette or neutral colour."""
    a = _rgb(image)
    names = list(ALL_COLOURS)
    table = np.array([ALL_COLOURS[n] for n in names], np.float64)
    nearest = ((a[..., None, :] - table) ** 2).sum(-1).argmin(-1)
    return float((nearest == names.index(colour)).mean())
