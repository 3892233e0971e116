"""Checkpoint selection, RNG round trips and EMA shards (no DeepSpeed engine needed here; the
engine-level save/resume paths run in tests/test_trainer.py with real ranks)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from coupling_dist.components.atomic import write_text as write_text_atomic
from coupling_dist.components.checkpoint import (MARKER, CheckpointError, CheckpointManager, complete_checkpoints,
                                                 find_resume, rng_state, set_rng_state, step_name)
from coupling_dist.components.ema import EMA


def make_ckpt(root, step: int, complete: bool = True, suffix: str = "") -> str:
    path = os.path.join(root, step_name(step) + suffix)
    os.makedirs(path)
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"x")
    if complete:
        write_text_atomic(os.path.join(path, MARKER), json.dumps({"step": step}))
    return path


def test_resume_never_picks_interrupted_writes(tmp_path):
    root = str(tmp_path)
    assert find_resume(root, "auto") is None
    good = make_ckpt(root, 100)
    make_ckpt(root, 200, complete=False)  # crashed before its marker
    make_ckpt(root, 300, suffix=".tmp")  # crashed mid-write (even with a marker inside)
    assert find_resume(root, "auto") == good
    write_text_atomic(os.path.join(root, "latest"), "step_00000200\n")  # pointer to a broken one
    assert find_resume(root, "auto") == good
    write_text_atomic(os.path.join(root, "latest"), "step_00000300.tmp\n")
    assert find_resume(root, "auto") == good
    newer = make_ckpt(root, 150)
    write_text_atomic(os.path.join(root, "latest"), "step_00000100\n")
    assert find_resume(root, "auto") == good  # latest wins when it is complete
    os.remove(os.path.join(root, "latest"))
    assert find_resume(root, "auto") == newer
    assert find_resume(root, "none") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*train.resume=none"):
        find_resume(root, os.path.join(root, "step_00000200"))
    assert find_resume(root, good) == good
    # a marker whose step disagrees with the directory name is not trusted
    bad = make_ckpt(root, 400)
    write_text_atomic(os.path.join(bad, MARKER), json.dumps({"step": 7}))
    assert [s for s, _ in complete_checkpoints(root)] == [100, 150]


def test_prune_keeps_last_k_and_stale_tmp(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for s in (10, 20, 30):
        make_ckpt(mgr.root, s)
    make_ckpt(mgr.root, 15, suffix=".tmp")
    make_ckpt(mgr.root, 40, suffix=".tmp")  # newer than every complete one: may be in progress
    mgr.prune()
    assert sorted(os.listdir(mgr.root)) == ["step_00000020", "step_00000030", "step_00000040.tmp"]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.randn(5), np.random.rand(3), random.random()
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    want = (random.random(), np.random.rand(4), torch.randn(6))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), np.random.rand(4), torch.randn(6))
    assert got[0] == want[0] and np.array_equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_ema_shards_reload_at_another_dp_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    # three "ranks" of a DP-3 run, each owning a third of the parameters
    emas = [EMA(model, 0.5, r, 3) for r in range(3)]
    assert sorted(n for e in emas for n in e.owned) == sorted(n for n, _ in model.named_parameters())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for e in emas:
        e.update()
    shards = [e.state_dict() for e in emas]
    two = [EMA(model, 0.5, r, 2) for r in range(2)]
    for e in two:
        e.load_shards(shards)
    merged = {n: t for e in two for n, t in e.shadow.items() if n in e.owned}
    for n, p in model.named_parameters():
        assert torch.allclose(merged[n], start[n] + 0.5), n  # 0.5 * start + 0.5 * (start + 1)
