"""Small classifiers whose penultimate layer is the feature space of a Fréchet distance.

The paper scores MNIST-Binary by FID and Fly Brain DNA by FBD (the Fréchet distance in a frozen
classifier's embedding). Neither the Inception weights nor the DeepFlyBrain classifier can be
fetched here, so each domain trains its own small classifier on real data and freezes it:

- ``digit2d``: a CNN on square binary images given as token ids [N, side*side] (raster order);
- ``seq1d``: a 1-D CNN over one-hot tokens [N, L] (DNA: vocab 4, L 500) with global max + mean
  pooling, so any length >= its receptive field works.

Both take token ids (one-hot inside, so a token id never acts as a magnitude) or soft inputs: a
float tensor [N, L, V] of per-position probabilities (a relaxed sample, ``guidance/relax.py``) is
used in place of the one-hot, so the classifier is differentiable in its input (the reward of
classifier guidance, ``guidance/reward.py``); the one-hot of ids as floats gives exactly the id
path's output. They expose ``features(tokens) -> [N, num_features]`` (the penultimate layer, after
its ReLU, like Inception's pool features) and ``forward -> logits``. ``width`` scales the
convolutions' channels (default 32: the evaluation classifier; the reward classifier is wider, so
it is a different network). ``train_feature_net`` is deterministic for a seed on CPU
(initialisation, the held-out split and the batch order all come from it). ``save_feature_net`` /
``load_feature_net`` write / read ``model.safetensors`` + ``feature_net.json`` atomically.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..components.atomic import write_dir

KINDS = ("digit2d", "seq1d")
WEIGHTS = "model.safetensors"
META = "feature_net.json"
NUM_FEATURES = 128


def as_token_tensor(tokens, vocab: int, length: Optional[int] = None) -> torch.Tensor:
    """Token ids (tensor / array / nested list) as int64 [N, L], checked against the vocabulary."""
    t = tokens.long() if torch.is_tensor(tokens) else torch.tensor(np.asarray(tokens), dtype=torch.long)
    if t.dim() != 2:
        raise ValueError(f"expected token ids of shape [N, L], got {tuple(t.shape)}")
    if length is not None and t.shape[1] != length:
        raise ValueError(f"expected sequences of length {length}, got {t.shape[1]}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}); got range [{int(t.min())}, {int(t.max())}]")
    return t


def input_one_hot(tokens, vocab: int, length: Optional[int], like: torch.Tensor) -> torch.Tensor:
    """[N, L, V] floats on ``like``'s device and dtype: the one-hot of token ids, or soft inputs (a
    floating tensor [N, L, V], e.g. probabilities) as they are, keeping their autograd graph."""
    if torch.is_tensor(tokens) and tokens.is_floating_point() and tokens.dim() == 3:
        if tokens.shape[2] != vocab or (length is not None and tokens.shape[1] != length):
            want = f"[N, {length if length is not None else 'L'}, {vocab}]"
            raise ValueError(f"expected soft inputs of shape {want}, got {tuple(tokens.shape)}")
        return tokens.to(device=like.device, dtype=like.dtype)
    t = as_token_tensor(tokens, vocab, length).to(like.device)
    return F.one_hot(t, vocab).to(like.dtype)


class Digit2D(nn.Module):
    """conv(3x3, 32) -> pool -> conv(3x3, 64) -> pool -> fc(128) [features] -> fc(n_classes)."""

    kind = "digit2d"

    def __init__(self, n_classes: int, vocab: int = 2, length: int = 784, width: int = 32):
        super().__init__()
        side = math.isqrt(length)
        if side * side != length or side % 4:
            raise ValueError(f"digit2d needs a square image whose side is a multiple of 4; length {length} is not")
        self.n_classes, self.vocab, self.length, self.side, self.width = n_classes, vocab, length, side, width
        self.num_features = NUM_FEATURES
        self.conv1 = nn.Conv2d(vocab, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (side // 4) ** 2, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, n_classes)

    def features(self, tokens) -> torch.Tensor:
        x = input_one_hot(tokens, self.vocab, self.length, self.fc.weight)  # [N, L, V]
        x = x.transpose(1, 2).reshape(len(x), self.vocab, self.side, self.side)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, tokens) -> torch.Tensor:
        return self.head(self.features(tokens))


class Seq1D(nn.Module):
    """Three conv1d(k=9) blocks (32, 64, 128 channels at width 32; max-pool 4 after the first two),
    global max and mean pooling, fc(128) [features] -> fc(n_classes)."""

    kind = "seq1d"

    def __init__(self, n_classes: int, vocab: int = 4, length: int = 500, width: int = 32):
        super().__init__()
        if length < 9 * 16:
            raise ValueError(f"seq1d needs sequences of length >= 144 (its receptive field); got {length}")
        self.n_classes, self.vocab, self.length, self.width = n_classes, vocab, length, width
        self.num_features = NUM_FEATURES
        self.conv1 = nn.Conv1d(vocab, width, 9, padding=4)
        self.conv2 = nn.Conv1d(width, 2 * width, 9, padding=4)
        self.conv3 = nn.Conv1d(2 * width, 4 * width, 9, padding=4)
        self.fc = nn.Linear(2 * 4 * width, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, n_classes)

    def features(self, tokens) -> torch.Tensor:
        x = input_one_hot(tokens, self.vocab, None, self.fc.weight).transpose(1, 2)  # [N, V, L]
        x = F.max_pool1d(F.relu(self.conv1(x)), 4)
        x = F.max_pool1d(F.relu(self.conv2(x)), 4)
        x = F.relu(self.conv3(x))
        pooled = torch.cat([x.amax(dim=2), x.mean(dim=2)], dim=1)
        return F.relu(self.fc(pooled))

    def forward(self, tokens) -> torch.Tensor:
        return self.head(self.features(tokens))


def build_feature_net(kind: str, n_classes: int, vocab: int, length: int, seed: int = 0, width: int = 32) -> nn.Module:
    """A freshly initialised classifier; the initial weights depend only on ``seed`` (and the shape)."""
    if kind not in KINDS:
        raise ValueError(f"unknown feature net kind '{kind}' (known: {', '.join(KINDS)})")
    if n_classes < 2 or vocab < 2:
        raise ValueError(f"a feature net needs n_classes >= 2 and vocab >= 2 (got {n_classes}, {vocab})")
    if width < 1:
        raise ValueError(f"a feature net needs width >= 1 (got {width})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = (Digit2D if kind == "digit2d" else Seq1D)(n_classes, vocab, length, width)
    return net


def _reinit(net: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in net.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                m.reset_parameters()


@torch.no_grad()
def accuracy(net: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    if not len(tokens):
        return float("nan")
    was = net.training
    net.eval()
    hits = sum(int((net(tokens[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
               for i in range(0, len(tokens), batch_size))
    net.train(was)
    return hits / len(tokens)


def soften(x: torch.Tensor, fraction: float, gen: torch.Generator, max_mix: float = 0.5) -> torch.Tensor:
    """One-hot inputs [B, L, V] with a ``fraction`` of the rows mixed with random distributions:
    row i -> (1 - a_i) one_hot + a_i softmax(2 g), a_i ~ U(0, max_mix), g standard normal per
    position (every position stays a distribution). Drawn from ``gen`` (deterministic)."""
    b = x.shape[0]
    rows = torch.rand(b, generator=gen) < fraction
    alpha = torch.rand(b, generator=gen) * max_mix * rows
    noise = torch.softmax(2.0 * torch.randn(x.shape, generator=gen), dim=-1)
    a = alpha.to(x.dtype).view(b, 1, 1)
    return (1 - a) * x + a * noise.to(x.dtype)


def train_feature_net(net: nn.Module, tokens, labels, steps: int, seed: int, batch_size: int = 128,
                      lr: float = 1e-3, heldout_fraction: float = 0.1, weight_decay: float = 1e-4,
                      soft_fraction: float = 0.0) -> dict:
    """Train ``net`` in place with AdamW on cross-entropy; left in eval mode.

    The weights are re-initialised from ``seed`` first, and a ``heldout_fraction`` of the examples
    (a seeded permutation) is kept out of training to measure accuracy, so the same (data, seed)
    gives bit-identical weights on CPU. ``soft_fraction`` > 0: that fraction of each batch is fed
    softened one-hots (``soften``: the reward classifier must score relaxed samples); 0 draws
    nothing extra, so the result is the same as before the option existed. Returns {heldout_acc,
    train_acc, steps, n_train, n_heldout} (train_acc on at most 5,000 training examples)."""
    t = as_token_tensor(tokens, net.vocab)
    y = labels.long() if torch.is_tensor(labels) else torch.tensor(np.asarray(labels), dtype=torch.long)
    if len(y) != len(t):
        raise ValueError(f"{len(t)} token rows but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= net.n_classes):
        raise ValueError(f"labels must lie in [0, {net.n_classes}); got range [{int(y.min())}, {int(y.max())}]")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in [0, 1); got {heldout_fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(t), generator=gen)
    n_held = int(round(heldout_fraction * len(t)))
    held, train = perm[:n_held], perm[n_held:]
    if len(train) < 1:
        raise ValueError("no training examples left after the held-out split")
    _reinit(net, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:  # epochs of seeded permutations, a batch never spans two
            order = train[torch.randperm(len(train), generator=gen)]
        idx, order = order[:batch_size], order[batch_size:]
        x = t[idx]
        if soft_fraction > 0:
            x = soften(F.one_hot(x, net.vocab).float(), soft_fraction, gen)
        loss = F.cross_entropy(net(x), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    tr = train[:5000]
    return dict(heldout_acc=accuracy(net, t[held], y[held]), train_acc=accuracy(net, t[tr], y[tr]),
                steps=steps, n_train=len(train), n_heldout=n_held)


def save_feature_net(net: nn.Module, out_dir: str, meta: Optional[dict] = None) -> str:
    """``out_dir``/model.safetensors + feature_net.json (the architecture and ``meta``), swapped in atomically."""
    from safetensors.torch import save_file

    arch = dict(kind=net.kind, n_classes=net.n_classes, vocab=net.vocab, length=net.length, width=net.width)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as fh:
            json.dump(dict(arch=arch, meta=meta or {}), fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")

    return write_dir(out_dir, write)


def load_feature_net(path: str) -> nn.Module:
    """The frozen classifier saved by ``save_feature_net`` (eval mode; its meta dict as ``.meta``)."""
    from safetensors.torch import load_file

    meta_path, weights = os.path.join(path, META), os.path.join(path, WEIGHTS)
    for p in (meta_path, weights):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: not a feature net directory (written by save_feature_net)")
    with open(meta_path, encoding="utf-8") as fh:
        doc = json.load(fh)
    try:
        arch = doc["arch"]
        net = build_feature_net(arch["kind"], arch["n_classes"], arch["vocab"], arch["length"],
                                width=int(arch.get("width", 32)))  # files written before width: 32
    except (KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: missing or bad 'arch' entry ({e})") from None
    net.load_state_dict(load_file(weights))
    net.meta = doc.get("meta", {})
    return net.eval()
