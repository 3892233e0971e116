"""Inputs of reward fine-tuning for tests, made in seconds: a small class-conditional one-step
generator export for MNIST-Binary (the demo's 7x7 latent grid of 4x4-pixel patches, random
weights: fine-tuning has everything to gain) and a reward classifier (the domain's digit2d, narrow)
trained briefly on real MNIST digits and saved as ``python -m coupling_dist.classifier`` saves it."""
from __future__ import annotations

import os

import torch

from conftest import ROOT

MNIST = os.path.join(ROOT, "configs", "mnist_demo.yaml")
CLASSES = 10
FAST = ["run.progress=false", "run.wandb.mode=disabled", "run.log_interval=1", f"data.num_classes={CLASSES}"]


def finetune_cfg(run_dir, *overrides):
    from coupling_dist.config import load_config

    return load_config(MNIST, [f"run.dir={run_dir}", *FAST, *overrides])


def make_generator_export(cfg, out: str, *, num_classes: int = CLASSES, seed: int = 0, latent_dim: int = 16) -> str:
    from coupling_dist.config import GeneratorConfig
    from coupling_dist.domains import build_domain
    from coupling_dist.models.generator import build_generator, export_generator

    domain = build_domain(cfg)
    arch = GeneratorConfig(kind="onestep", width=32, depth=1, heads=4, ffn=64)
    patch, T = cfg.stage_a.patch, cfg.data.seq_len
    vocab = domain.head_rows(domain.vocab_size, 1)
    torch.manual_seed(seed)
    g = build_generator(arch, latent_dim, T, vocab, None, patch, num_classes)
    meta = {"latent_dim": latent_dim, "seq_len": T, "vocab_size": vocab, "patch": patch, "tokenizer": domain.tokenizer_identity(),
            "tokenizer_vocab_size": domain.vocab_size, "num_classes": num_classes, "train_step": 0}
    return export_generator(g, arch, meta, out)


def make_reward(cfg, out: str, *, steps: int = 120, seed: int = 1, width: int = 8, length: int = None) -> str:
    """A digit2d reward classifier trained ``steps`` AdamW steps on 2,000 real digits (raster order)."""
    from coupling_dist.data.mnist import load_mnist_5k
    from coupling_dist.evaluation.feature_net import build_feature_net, save_feature_net, train_feature_net

    pixels, labels = load_mnist_5k()
    tokens, y = torch.from_numpy(pixels[:2000].astype("int64")), torch.from_numpy(labels[:2000].astype("int64"))
    net = build_feature_net("digit2d", CLASSES, 2, length or cfg.data.seq_len, seed, width)
    info = {}
    if length is None:  # another length: an untrained classifier of other images (pre-flight tests)
        info = train_feature_net(net, tokens, y, steps=steps, seed=seed, batch_size=64, soft_fraction=0.5)
    return save_feature_net(net, out, dict(info, role="reward", kind="digit2d", domain="binary_image", n_classes=CLASSES))
