"""Stage B objectives as the paper defines them: the one-step CE over all T positions (Eq. 2, pads
after the first EOS included), the masked denoiser's masks over every position with empty rows
redrawn (Algorithm 2) and its per-sequence normalisation (Eq. 32), and latent mixing per update."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from conftest import demo_cfg

from coupling_dist.config import GeneratorConfig
from coupling_dist.models.generator import Generator
from coupling_dist.stages.stage_b.task import StageBTask, mdm_mask

V, T, D, EOS = 40, 6, 4, 3


class Rank:
    """A data-parallel position without a process group (what ``ParallelDims`` tells the task)."""

    def __init__(self, dp_rank):
        self.dp_rank, self.mpu, self.tp = dp_rank, None, 1


def _task(tmp_path, *over, masked=False):
    cfg = demo_cfg(tmp_path, *over, f"stage_b.model.kind={'masked' if masked else 'onestep'}")
    info = {"latent_dim": D, "seq_len": T, "vocab_size": V, "mask_token_id": V - 1 if masked else None,
            "teacher": None, "eos_id": EOS}
    return StageBTask(cfg, info, Rank(0))


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)  # real tokens incl. the first EOS
    mask = torch.arange(T)[None] < lengths[:, None]
    tokens = torch.randint(5, V - 1, (n, T), generator=g)
    tokens[torch.arange(n), lengths - 1] = EOS
    tokens = torch.where(mask, tokens, torch.full_like(tokens, EOS))  # pad id = EOS (Qwen, SmolLM2)
    return {"z": torch.randn(n, 1, T, D, generator=g), "tokens": tokens, "mask": mask.to(torch.uint8)}


def test_mdm_masks_cover_pads_and_no_row_is_empty():
    g = torch.Generator().manual_seed(0)
    m = mdm_mask(4000, 3, g)
    assert m.any(1).all()  # 1 / (T + 1) = 25 % of rows would be empty without the redraw
    assert m[:, 2].float().mean() > 0.3  # the last position (a pad in short rows) is masked too


def test_masked_denoiser_loss_is_eq32(tmp_path):
    task = _task(tmp_path, masked=True)
    torch.manual_seed(0)
    model = Generator(GeneratorConfig(kind="masked", width=32, depth=1, heads=4, ffn=64), D, T, V, V - 1)
    batch = _batch()
    total, _ = task._loss(model, batch, step=3, train=True)
    z, tokens, mask, x_t, _ = task.inputs(batch, 3, True)  # same (seed, step) -> same draws
    m = x_t == V - 1
    assert (m & ~mask).any()  # pads are masked (and so scored)
    nll = F.cross_entropy(model(z, x_t).transpose(1, 2), tokens, reduction="none")
    eq32 = ((nll * m).sum(1) / m.sum(1)).mean()  # 1 / sum_i m_i per sequence, then the batch mean
    torch.testing.assert_close(total, eq32, rtol=1e-5, atol=1e-6)
    pooled = (nll * m).sum() / m.sum()  # what a batch-token mean would give: a different number
    assert abs(float(pooled.detach()) - float(eq32.detach())) > 1e-4


def test_onestep_ce_scores_all_positions(tmp_path):
    torch.manual_seed(0)
    model = Generator(GeneratorConfig(kind="onestep", width=32, depth=1, heads=4, ffn=64), D, T, V)
    batch = _batch()
    z = batch["z"][:, 0]
    nll = F.cross_entropy(model(z).transpose(1, 2), batch["tokens"].long(), reduction="none")
    task = _task(tmp_path, "stage_b.latent_mix_prob=0")
    total, _ = task._loss(model, batch, step=0, train=True)
    torch.testing.assert_close(total, nll.mean(), rtol=1e-5, atol=1e-6)  # Eq. 2 over all B x T positions
    real = batch["mask"].bool()
    task = _task(tmp_path, "stage_b.latent_mix_prob=0", "stage_b.pad_weight=0")
    total, _ = task._loss(model, batch, step=0, train=True)
    torch.testing.assert_close(total, nll[real].mean(), rtol=1e-5, atol=1e-6)


def test_latent_mixing_per_update_is_shared_by_the_batch_and_the_ranks(tmp_path):
    batch = _batch(n=16)
    z0 = batch["z"][:, 0].float()
    per_update = _task(tmp_path, "stage_b.latent_mix_prob=0.5")
    mixed_steps = 0
    for step in range(40):
        z, *_ = per_update.inputs(batch, step, True)
        replaced = ~torch.isclose(z, z0).all(-1).all(-1)
        assert replaced.all() or not replaced.any()  # the whole update, never part of it
        mixed_steps += int(replaced.all())
        per_update.dims = Rank(1)  # another data-parallel rank makes the same decision at this step
        z1, *_ = per_update.inputs(batch, step, True)
        per_update.dims = Rank(0)
        assert bool((~torch.isclose(z1, z0).all(-1).all(-1)).all()) == bool(replaced.all())
    assert 10 <= mixed_steps <= 30
    per_sample = _task(tmp_path, "stage_b.latent_mix_prob=0.5", "stage_b.latent_mix_unit=sample")
    z, *_ = per_sample.inputs(batch, 0, True)
    replaced = ~torch.isclose(z, z0).all(-1).all(-1)
    assert replaced.any() and not replaced.all()
