"""The reward of classifier guidance and Algorithm 5: soft inputs of the feature nets, the relaxations
(F.1), the reward in the generator's terms (head rows, 4x4-patch order) and latent classifier
guidance with a frozen generator."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from coupling_dist.config import load_config
from coupling_dist.domains import build_domain
from coupling_dist.evaluation.feature_net import build_feature_net, save_feature_net
from coupling_dist.guidance.latent import classifier_guided_latents, guided_reward, latent_guidance_settings
from coupling_dist.guidance.relax import relax
from coupling_dist.guidance.reward import feature_permutation, load_reward

MNIST_DEMO = os.path.join(ROOT, "configs", "mnist_demo.yaml")
HEAD = 8  # binary_image heads: the two pixel ids padded to 8 rows (LabelledCodecDomain.head_rows)


@pytest.fixture(scope="module")
def mnist_reward(tmp_path_factory):
    """A small digit2d classifier, briefly trained on real digits (the equalities below hold for any
    weights; guidance needs a classifier with a slope), saved and loaded as the reward of a
    patch-16 binary-image generator with an 8-row head."""
    from coupling_dist.data.mnist import load_mnist_5k
    from coupling_dist.evaluation.feature_net import train_feature_net

    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path_factory.mktemp('run')}"])
    dom = build_domain(cfg)
    net = build_feature_net("digit2d", 10, 2, 784, seed=3, width=8)
    pixels, labels = load_mnist_5k()
    idx = np.arange(1, 5000, 4)  # the asset is sorted by digit: every 4th digit, 125 of each class
    info = train_feature_net(net, pixels[idx], labels[idx], steps=150, seed=3, batch_size=64, soft_fraction=0.5)
    assert info["heldout_acc"] > 0.6, info
    path = save_feature_net(net, os.path.join(cfg.run.dir, "classifier", "export"), {"role": "reward"})
    # the stage directory resolves to its export/
    reward = load_reward(os.path.join(cfg.run.dir, "classifier"), dom, {"seq_len": 784, "vocab_size": HEAD})
    return cfg, dom, net, reward, path


@pytest.mark.parametrize("kind,vocab,length", [("digit2d", 2, 784), ("seq1d", 4, 200)])
def test_soft_one_hot_equals_ids_and_is_differentiable(kind, vocab, length):
    net = build_feature_net(kind, 5, vocab, length, seed=1).eval()
    ids = torch.randint(0, vocab, (6, length), generator=torch.Generator().manual_seed(0))
    soft = F.one_hot(ids, vocab).float().requires_grad_(True)
    out = net(soft)
    assert torch.equal(out, net(ids)) and torch.equal(net.features(soft), net.features(ids))
    out[:, 0].sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"soft inputs of shape"):
        net(torch.zeros(2, length, vocab + 1))


def test_reward_on_soft_one_hot_of_real_ids_is_the_classifier_log_softmax(mnist_reward):
    cfg, dom, net, reward, _ = mnist_reward
    from coupling_dist.data.mnist import load_mnist_5k

    pixels, labels = load_mnist_5k()
    idx = np.arange(0, 5000, 312)[:16]  # 16 digits, every class (the asset is sorted by digit)
    raster, y = pixels[idx].astype(np.int64), torch.from_numpy(labels[idx].astype(np.int64))
    model_order = dom.codec.to_tokens(raster)  # what the generator emits: 4x4 patches
    assert not np.array_equal(model_order, raster)
    probs = F.one_hot(torch.from_numpy(model_order), HEAD).float()  # head rows 2..7 carry nothing
    want = torch.log_softmax(net(torch.from_numpy(raster)), -1).gather(1, y[:, None])[:, 0]
    got = reward(probs, y)
    assert got.shape == (16,) and len(set(y.tolist())) == 10 and torch.equal(got, want)
    # the permutation is the domain's feature_tokens: raster[j] = tokens[perm[j]]
    perm = feature_permutation(dom, 784)
    assert torch.equal(torch.from_numpy(model_order)[:, perm], torch.from_numpy(raster))
    # a relaxed input with mass on the extra head rows is renormalised over the two pixel rows
    logits = torch.randn(4, 784, HEAD, generator=torch.Generator().manual_seed(1))
    full = reward(torch.softmax(logits, -1), y[:4])
    restricted = reward(torch.softmax(logits[..., :2], -1), y[:4])
    assert torch.allclose(full, restricted, atol=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in reward.net.parameters())
    with pytest.raises(ValueError, match=r"reward labels must lie in \[0, 10\)"):
        reward(probs[:1], torch.tensor([10]))


def test_dna_reward_reads_model_order_and_the_first_four_head_rows(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "dna_demo.yaml"), [f"run.dir={tmp_path}"])
    dom = build_domain(cfg)
    T = cfg.data.seq_len
    net = build_feature_net("seq1d", 7, 4, T, seed=2, width=8)
    reward = load_reward(save_feature_net(net, str(tmp_path / "c")), dom, {"seq_len": T, "vocab_size": 8})
    assert reward.perm is None  # DNA: the classifier reads the model's order
    ids = torch.randint(0, 4, (5, T), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 6, 1, 2])
    want = torch.log_softmax(net(ids), -1).gather(1, y[:, None])[:, 0]
    assert torch.equal(reward(F.one_hot(ids, 8).float(), y), want)


def test_load_reward_refusals_name_the_path(tmp_path, mnist_reward):
    from coupling_dist.components.preflight import InputError

    cfg, dom, _, _, path = mnist_reward
    with pytest.raises(InputError, match=r"no reward classifier at .*python -m coupling_dist.classifier"):
        load_reward(str(tmp_path), dom, None)
    with pytest.raises(InputError, match=r"sequences of 784 tokens, the generator makes 400"):
        load_reward(path, dom, {"seq_len": 400, "vocab_size": HEAD})
    seq = save_feature_net(build_feature_net("seq1d", 3, 4, 784), str(tmp_path / "seq"))
    with pytest.raises(InputError, match=r"a seq1d classifier, but data.domain binary_image uses digit2d"):
        load_reward(seq, dom, None)


# --------------------------------------------------------------------------- relaxations


def test_softmax_relaxation_gradient_matches_finite_differences_and_is_the_sigmoid_for_two_ids():
    logits = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64)
    f = lambda x: (relax(x, "softmax", 0.7) * w).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(logits), logits)
    eps, fd = 1e-6, torch.zeros_like(grad)
    for idx in np.ndindex(*logits.shape):
        d = torch.zeros_like(logits)
        d[idx] = eps
        fd[idx] = (f(logits.detach() + d) - f(logits.detach() - d)) / (2 * eps)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6)
    two = torch.randn(100, 2, dtype=torch.float64)
    assert torch.allclose(relax(two, "softmax", 0.5)[:, 1], torch.sigmoid((two[:, 1] - two[:, 0]) / 0.5), atol=1e-15)


def test_straight_through_forward_is_exactly_one_hot_with_the_softmax_gradient():
    logits = torch.randn(4, 7, 5, requires_grad=True)
    st = relax(logits, "straight_through", 0.5)
    assert torch.equal(st, F.one_hot(logits.argmax(-1), 5).float())
    w = torch.randn(4, 7, 5)
    (g_st,) = torch.autograd.grad((st * w).sum(), logits)
    (g_soft,) = torch.autograd.grad((relax(logits, "softmax", 0.5) * w).sum(), logits)
    assert torch.equal(g_st, g_soft)


def test_gumbel_is_reproducible_with_seeded_generators():
    logits = torch.randn(3, 6, 4)
    a = relax(logits, "gumbel", 0.5, torch.Generator().manual_seed(7))
    b = relax(logits, "gumbel", 0.5, torch.Generator().manual_seed(7))
    c = relax(logits, "gumbel", 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.sum(-1), torch.ones(3, 6)) and not torch.allclose(a, relax(logits, "softmax", 0.5))
    # per-row generators: a row's noise does not depend on the other rows of its batch
    rows = relax(logits, "gumbel", 0.5, [torch.Generator().manual_seed(100 + i) for i in range(3)])
    alone = relax(logits[2:], "gumbel", 0.5, [torch.Generator().manual_seed(102)])
    assert torch.equal(rows[2:], alone)
    with pytest.raises(ValueError, match="unknown relaxation 'hard'"):
        relax(logits, "hard", 1.0)


# --------------------------------------------------------------------------- Algorithm 5


class TinyConditionalGenerator(nn.Module):
    """G(z, y): z [B, 49, 16] (+ a class embedding) -> logits [B, 784, 8] in 4x4-patch order
    (each latent position emits its 16 pixels), the model API of the class-conditional generators."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.mix = nn.Linear(16, 64)
        self.out = nn.Linear(64, 16 * HEAD)

    def forward(self, z, x_t=None, labels=None):
        lab = torch.full((len(z),), 10) if labels is None else labels.clamp_min(-1) % 11
        h = torch.tanh(self.mix(z + self.embed(lab)[:, None]))
        return self.out(h).view(len(z), 49 * 16, HEAD)


def test_algorithm_5_increases_the_reward_with_the_generator_untouched(mnist_reward):
    _, _, _, reward, _ = mnist_reward
    model = TinyConditionalGenerator().eval()
    model.out.bias.requires_grad_(False)  # a mixed requires_grad state, restored as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(12, 49, 16, generator=g)
    y = torch.arange(12) % 10
    for relaxation in ("softmax", "gumbel", "straight_through"):
        trace = []
        gen = torch.Generator().manual_seed(1)
        zk = classifier_guided_latents(model, z0, y, reward, steps=5, step_size=10.0, relaxation=relaxation,
                                       tau=1.0, generator=gen, trace=trace)
        assert len(trace) == 5 and zk.shape == z0.shape and not zk.requires_grad
        with torch.no_grad():
            r0 = guided_reward(model, z0, y, reward, "softmax").mean()
            rk = guided_reward(model, zk, y, reward, "softmax").mean()
        if relaxation == "softmax":  # the objective ascended: monotone for this small step
            means = [float(t.mean()) for t in trace] + [float(rk)]
            assert all(b > a for a, b in zip(means, means[1:])), means
        assert rk > r0 + 1.0, (relaxation, float(r0), float(rk))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n], n
    assert all(p.grad is None for p in reward.net.parameters())
    # K = 0 is the unguided latent
    assert torch.equal(classifier_guided_latents(model, z0, y, reward, steps=0, step_size=1.0), z0)


def test_algorithm_5_with_the_real_class_conditional_generator(mnist_reward):
    """The same with ``models.generator.Generator`` (patch 16, 8-row head, 10 classes)."""
    import inspect

    from coupling_dist.config import GeneratorConfig
    from coupling_dist.models.generator import Generator

    if "num_classes" not in inspect.signature(Generator.__init__).parameters:
        pytest.skip("the class-conditional generator (G(z, y)) is not on this branch yet")
    _, _, _, reward, _ = mnist_reward
    torch.manual_seed(0)
    model = Generator(GeneratorConfig(width=32, depth=1, heads=2, ffn=64), 16, 784, HEAD, patch=16,
                      num_classes=10).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    z0 = torch.randn(10, 49, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    zk = classifier_guided_latents(model, z0, y, reward, steps=5, step_size=10.0)
    with torch.no_grad():
        r0 = guided_reward(model, z0, y, reward).mean()
        rk = guided_reward(model, zk, y, reward).mean()
    assert rk > r0 + 0.5, (float(r0), float(rk))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad, n


def test_latent_guidance_settings_read_sample_classifier(tmp_path):
    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path}", "sample.classifier.steps=3", "sample.classifier.step_size=0.5",
                                   "sample.classifier.relaxation=gumbel", "sample.classifier.tau=0.5"])
    s = latent_guidance_settings(cfg)
    assert s == {"path": os.path.join(str(tmp_path), "classifier", "export"), "steps": 3, "step_size": 0.5,
                 "relaxation": "gumbel", "tau": 0.5}
    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path}", "classifier.out=/x/c"])
    assert latent_guidance_settings(cfg)["path"] == "/x/c"
    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path}", "classifier.out=/x/c", "sample.classifier.path=/y"])
    assert latent_guidance_settings(cfg)["path"] == "/y"
