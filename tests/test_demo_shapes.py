"""The demo model's judges: the shape, colour and background classifiers read drawn scenes back exactly,
survive the blur a small VAE adds, and do not see stars (or anything) in shapeless blobs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from mlsd.demo import shapes


def _scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(n)]


def test_every_colour_shape_and_background_reads_back():
    rng = random.Random(5)
    for colour, shape, background in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.BACKGROUNDS):
        if colour == background:
            continue
        scene = shapes.Scene(shape, colour, background, 32 + rng.uniform(-4, 4), 32 + rng.uniform(-4, 4),
                             rng.uniform(14, 21))
        r = shapes.read_image(shapes.render(scene))
        assert (r.shape, r.colour, r.background) == (shape, colour, background), scene


@pytest.mark.parametrize("radius", [1.0, 1.5])
def test_blurred_scenes_still_read_back(radius):
    """A decoded image is softer than a drawn one; a 1.5 px blur keeps every reading."""
    misses = [s for s in _scenes(120, 9)
              if (r := shapes.read_image(shapes.render(s).filter(ImageFilter.GaussianBlur(radius)))).shape != s.shape
              or r.colour != s.colour]
    assert not misses


def test_a_heavily_blurred_star_reads_as_round():
    """Control for the blur test: rounded points are not a star any more (the judge is not lenient)."""
    stars = [s for s in _scenes(200, 11) if s.shape == "star"][:20]
    readings = [shapes.read_image(shapes.render(s).filter(ImageFilter.GaussianBlur(3.5))).shape for s in stars]
    assert readings.count("star") <= 2 and readings.count("circle") >= 15


def test_shapeless_blobs_are_not_stars():
    rng = np.random.default_rng(0)
    stars = 0
    for _ in range(100):
        a = np.full((64, 64, 3), 245, np.uint8)
        a[np.kron(rng.random((8, 8)) > 0.6, np.ones((8, 8), bool))] = shapes.COLOURS["red"]
        stars += shapes.read_image(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1))).shape == "star"
    assert stars == 0


def test_two_circles_are_not_one_shape():
    image = Image.new("RGB", (64, 64), shapes.NEUTRALS["white"])
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 4, 26, 26], fill=shapes.COLOURS["blue"])
    draw.ellipse([38, 38, 60, 60], fill=shapes.COLOURS["blue"])
    r = shapes.read_image(image)
    assert r.colour == "blue" and r.shape is None


def test_a_stray_speck_does_not_change_the_shape():
    for shape in shapes.SHAPES:
        image = shapes.render(shapes.Scene(shape, "red", "white", 30, 30, 16))
        image.paste(shapes.COLOURS["red"], (58, 2, 61, 5))  # a 3x3 speck in the far corner
        assert shapes.read_image(image).shape == shape


def test_an_empty_image_has_no_shape():
    r = shapes.read_image(Image.new("RGB", (64, 64), shapes.NEUTRALS["gray"]))
    assert (r.background, r.shape, r.colour) == ("gray", None, None)


def test_convex_hull_area_against_geometry():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 5:45] = True
    assert shapes.convex_hull_area(mask) == 20 * 40
    mask[40, 60] = True  # one far pixel: the hull becomes the rectangle plus a triangle to that pixel's square
    assert 20 * 40 < shapes.convex_hull_area(mask) < 20 * 40 + 0.5 * 41 * 56
    assert shapes.convex_hull_area(np.zeros((8, 8), bool)) == 0.0
    assert shapes.convex_hull_area(np.eye(8, dtype=bool)) == 8 + 7  # a staircase of unit squares
    disc = np.hypot(*np.mgrid[-32:32, -32:32] + 0.5) <= 20
    assert abs(shapes.convex_hull_area(disc) - np.pi * 20**2) / (np.pi * 20**2) < 0.06


@pytest.mark.parametrize("sag", [0.2, 0.35])
def test_a_triangle_with_sagging_sides_is_not_a_star(sag):
    """Concave, as a star is, but with three points: the star's outline does not fit it."""
    corners = shapes.outline("triangle", 32, 32, 20)
    cx, cy = np.mean(corners, axis=0)
    polygon = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        polygon += [(x0, y0), (mx + sag * (cx - mx), my + sag * (cy - my))]
    image = Image.new("RGB", (256, 256), shapes.NEUTRALS["white"])
    ImageDraw.Draw(image).polygon([(4 * x, 4 * y) for x, y in polygon], fill=shapes.COLOURS["orange"])
    assert shapes.read_image(image.resize((64, 64), Image.Resampling.BOX)).shape != "star"


def test_the_demo_checks_each_word_the_prompt_names():
    from mlsd.demo.run import matches

    image = shapes.read_image(shapes.render(shapes.Scene("star", "yellow", "black", 32, 32, 18)))
    for prompt in ("a yellow star on a black background", "A Yellow Star", "the star", "a star on a black background",
                   "a yellow star on a black background, detailed"):
        assert matches(prompt, image), prompt
    for prompt in ("a red star", "a yellow circle", "a star on a white background", "a blue square"):
        assert matches(prompt, image) is False, prompt
    assert matches("a cat", image) is None and matches("a superstar", image) is None  # nothing to check
