"""The histogram k-means behind palettization, checked against scikit-learn's k-means on the same weights."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from converters.coreml.kmeans import kmeans_lut


def _weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "gauss":
        w = rng.standard_normal((512, 320)) * 0.02
    elif kind == "laplace":
        w = rng.laplace(size=(256, 320)) * 0.01
    elif kind == "uniform":
        w = rng.uniform(-0.1, 0.1, (128, 320))
    else:  # a bell plus a far, small mode: outliers that deserve clusters of their own
        w = np.concatenate([rng.standard_normal(60_000) * 0.01, rng.standard_normal(600) * 0.3 + 1.0])
    return w.astype(np.float16)


def _mse(lut, indices, weight) -> float:
    return float(((lut[indices].astype(np.float64) - weight.reshape(-1).astype(np.float64)) ** 2).mean())


@pytest.mark.parametrize("kind", ["gauss", "laplace", "uniform", "outliers"])
def test_squared_error_matches_scikit_learn_kmeans(kind):
    weight = _weights(kind)
    lut, indices = kmeans_lut(weight, 6)
    assert lut.dtype == np.float16 and lut.shape == (64,)
    assert indices.dtype == np.uint8 and indices.shape == (weight.size,) and indices.max() < 64
    ours = _mse(lut, indices, weight)
    km = KMeans(64, init="k-means++", n_init=3, random_state=0).fit(weight.reshape(-1, 1).astype(np.float64))
    theirs = float(km.inertia_) / weight.size
    assert ours <= 1.06 * theirs, (kind, ours, theirs)
    # Negative control: one bit fewer (a LUT half as long) fails the same gate.
    assert _mse(*kmeans_lut(weight, 5), weight) > 1.06 * theirs


def test_every_element_maps_to_its_nearest_lut_entry():
    weight = _weights("gauss")
    lut, indices = kmeans_lut(weight, 4)
    distance = np.abs(weight.reshape(-1, 1).astype(np.float64) - lut.astype(np.float64))
    assert np.array_equal(distance[np.arange(weight.size), indices], distance.min(1))


def test_few_distinct_values_are_kept_exactly():
    weight = (np.arange(40, dtype=np.float16) / 8).repeat(100)
    lut, indices = kmeans_lut(weight, 6)
    assert np.array_equal(lut[indices], weight)


def test_float32_weights_take_the_unique_path():
    weight = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    lut, indices = kmeans_lut(weight, 6)
    assert lut.dtype == np.float32
    km = KMeans(64, n_init=3, random_state=0).fit(weight.reshape(-1, 1).astype(np.float64))
    assert _mse(lut, indices, weight) <= 1.06 * float(km.inertia_) / weight.size
