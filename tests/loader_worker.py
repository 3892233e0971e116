"""Run by tests/test_loader.py under torchrun: ShardLoader on real ranks over gloo.

Phase 1: every rank iterates ``--steps`` batches from step 0 (crossing an epoch boundary);
the ranks all_gather their sample keys per step and rank 0 checks that the slices are disjoint
and writes them. Phase 2: a fresh loader resumes from ``--resume-state`` (a state saved by a
run at another world size) for ``--resume-steps`` batches, reading with DataLoader workers.
Rank 0 writes everything, plus its phase-1 state after ``--save-at`` steps, to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from coupling_dist.components import dist as D  # noqa: E402
from coupling_dist.data.loader import ShardLoader  # noqa: E402


def gather_keys(batch) -> list:
    out = [None] * D.world_size()
    dist.all_gather_object(out, [k for k in batch["__key__"]])
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-at", type=int, required=True)
    p.add_argument("--resume-state", required=True)
    p.add_argument("--resume-steps", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    info = D.init_distributed()
    assert dist.get_backend() == "gloo"
    r, w = info["rank"], info["world"]
    loader = ShardLoader(a.dir, "train", a.batch, a.seed, r, w, with_keys=True)
    phase1, saved, lens = [], None, []
    it = iter(loader)
    for _ in range(a.steps):
        try:
            batch = next(it)
        except StopIteration:  # epoch end: the loader continues from its own step
            it = iter(loader)
            batch = next(it)
        lens.append(len(batch["__key__"]))
        ranks = gather_keys(batch)
        flat = [k for part in ranks for k in part]
        assert len(set(flat)) == len(flat), "rank slices overlap"
        phase1.append(ranks)
        if loader.step == a.save_at:
            saved = loader.state_dict()
    assert len(set(lens)) == 1, f"rank {r} got uneven batch sizes {lens}"
    loader2 = ShardLoader(a.dir, "train", a.batch, a.seed, r, w, num_workers=a.workers, with_keys=True)
    loader2.load_state_dict(json.loads(a.resume_state))
    phase2 = []
    it = iter(loader2)
    for _ in range(a.resume_steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader2)
            batch = next(it)
        phase2.append(gather_keys(batch))
    if r == 0:
        with open(a.out, "w") as fh:
            json.dump({"world": w, "phase1": phase1, "saved": saved, "phase2": phase2,
                       "steps_per_epoch": loader.steps_per_epoch}, fh)
    D.barrier()
    D.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
