"""Feature nets and the Fréchet distance on the real MNIST 5k digits (binarised like MNIST-Binary)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from coupling_dist.data.mnist import load_mnist_5k
from coupling_dist.evaluation import frechet
from coupling_dist.evaluation.feature_net import (build_feature_net, load_feature_net, save_feature_net,
                                                  train_feature_net)
from coupling_dist.evaluation.frechet import frechet_distance, inception_fid


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def trained(mnist):
    px, y = mnist
    net = build_feature_net("digit2d", 10, 2, 784)
    report = train_feature_net(net, px, y, steps=120, seed=0, batch_size=64)
    return net, report


def test_mnist_5k_asset(mnist):
    px, y = mnist
    assert px.shape == (5000, 784) and px.dtype == np.uint8 and set(np.unique(px)) == {0, 1}
    assert np.bincount(y).tolist() == [500] * 10
    assert 0.08 < px.mean() < 0.2  # ink covers ~13% of a binarised MNIST digit


def test_classifier_learns_and_features_shape(trained, mnist):
    net, report = trained
    assert report["heldout_acc"] > 0.85 and report["n_heldout"] == 500 and report["steps"] == 120
    feats = net.features(torch.as_tensor(mnist[0][:7].copy()))
    assert feats.shape == (7, net.num_features) and net(torch.as_tensor(mnist[0][:7].copy())).shape == (7, 10)


def test_train_is_deterministic_for_a_seed(mnist):
    px, y = mnist[0][:600], mnist[1][:600]
    states = []
    for seed in (3, 3, 4):
        net = build_feature_net("digit2d", 10, 2, 784, seed=99)  # train re-initialises from its own seed
        train_feature_net(net, px, y, steps=5, seed=seed, batch_size=32)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_frechet_separates_data_from_the_factorized_baseline(trained, mnist):
    net, _ = trained
    px = mnist[0]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(px))
    a, b = px[perm[:2500]], px[perm[2500:]]
    factorized = (rng.random(a.shape) < a.mean(0)).astype(np.uint8)  # per-pixel Bernoulli marginals
    same = frechet_distance(net, a, a)
    held = frechet_distance(net, a, b)
    fact = frechet_distance(net, a, factorized)
    assert abs(same) < 1e-3
    assert fact > 10 * held > 0


def test_frechet_rejects_bad_inputs(trained):
    net, _ = trained
    with pytest.raises(ValueError, match="at least 2 fake"):
        frechet_distance(net, np.zeros((4, 784), np.uint8), np.zeros((1, 784), np.uint8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\)"):
        frechet_distance(net, np.full((4, 784), 2), np.zeros((4, 784), np.uint8))


def test_save_load_round_trip(trained, mnist, tmp_path):
    net, report = trained
    out = save_feature_net(net, str(tmp_path / "fnet"), meta=dict(dataset="mnist_5k", **report))
    assert sorted(os.listdir(out)) == ["feature_net.json", "model.safetensors"]
    back = load_feature_net(out)
    x = torch.as_tensor(mnist[0][:64].copy())
    assert torch.equal(back.features(x), net.features(x))
    assert back.meta["dataset"] == "mnist_5k" and json.load(open(os.path.join(out, "feature_net.json")))["arch"]["kind"] == "digit2d"
    with pytest.raises(FileNotFoundError, match="feature_net.json not found"):
        load_feature_net(str(tmp_path))


def test_seq1d_shapes():
    net = build_feature_net("seq1d", 3, 4, 500)
    x = torch.randint(0, 4, (5, 500))
    assert net.features(x).shape == (5, net.num_features) and net(x).shape == (5, 3)
    with pytest.raises(ValueError, match="unknown feature net kind"):
        build_feature_net("seq2d", 3, 4, 500)


def test_inception_fid_is_none_without_local_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert frechet.inception_weights_path() is None
    assert inception_fid(np.zeros((4, 784)), np.ones((4, 784))) is None
