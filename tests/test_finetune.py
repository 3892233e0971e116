"""Reward fine-tuning (Algorithm 6, ``python -m coupling_dist.finetune``): the (z, y) source, the
anchor penalties, the pre-flight refusals, a real run that raises the reward with a bounded anchor
distance and exports a generator that loads and samples, and a 2-rank kill-and-resume that replays
the uninterrupted run bit for bit. Inputs: a small class-conditional generator export and a reward
classifier trained on real MNIST digits (``finetune_fixtures.py``)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT, run_module, torchrun

from coupling_dist.stages.finetune.latents import LatentLoader

# --------------------------------------------------------------------------- (z, y) source


def test_latent_batches_are_a_function_of_seed_and_step_sliced_by_rank():
    kw = dict(global_batch=6, positions=5, latent_dim=3, num_classes=4, labels="balanced", latent_scale=0.5, seed=7)
    one = LatentLoader(**kw, dp_rank=0, dp_world=1)
    halves = [LatentLoader(**kw, dp_rank=r, dp_world=2) for r in range(2)]
    it1, its = iter(one), [iter(h) for h in halves]
    for step in range(3):
        full = next(it1)
        parts = [next(i) for i in its]
        assert torch.equal(torch.cat([p["z"] for p in parts]), full["z"])  # rank slices of one global batch
        assert full["labels"].tolist() == [(step * 6 + i) % 4 for i in range(6)]  # balanced over consecutive batches
    assert 0.3 < float(full["z"].std()) < 0.7  # latent_scale 0.5
    resumed = LatentLoader(**kw, dp_rank=0, dp_world=1)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(next(iter(resumed))["z"], next(it1)["z"])  # the position is the step
    held = LatentLoader(**kw, dp_rank=0, dp_world=1, salt=1)
    assert not torch.equal(next(iter(held))["z"], LatentLoader(**kw, dp_rank=0, dp_world=1).global_batch(0)["z"])
    uni = LatentLoader(**dict(kw, labels="uniform", global_batch=4000), dp_rank=0, dp_world=1).global_batch(0)["labels"]
    counts = torch.bincount(uni, minlength=4)
    assert counts.min() > 850 and counts.max() < 1150


def test_anchor_distances():
    from coupling_dist.config import load_config
    from coupling_dist.stages.finetune.task import FinetuneTask

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    logit = FinetuneTask(load_config(None, ["finetune.anchor=logit"]), {})
    kl = FinetuneTask(load_config(None, ["finetune.anchor=kl"]), {})
    assert torch.allclose(logit.anchor_distance(a, b), ((a - b) ** 2).mean())
    p, q = torch.softmax(b, -1), torch.softmax(a, -1)  # KL(p_theta0 || p_theta), theta0's logits second
    assert torch.allclose(kl.anchor_distance(a, b), (p * (p / q).log()).sum(-1).mean())
    assert float(kl.anchor_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl.anchor_distance(a, a + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant, unlike logit MSE
    assert float(logit.anchor_distance(a, a + 3.0)) == pytest.approx(9.0)
