"""A toy task + deterministic step-based loader driven by the real Trainer (launched by tests).

Usage: python -m torch.distributed.run ... tests/trainer_worker.py --dir D [--steps N] [--zero Z] ...
Writes <dir>/final.pt (rank 0): the model's fp32 weights and EMA, for bitwise comparisons.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coupling_dist.components import dist as D  # noqa: E402
from coupling_dist.components.logging import setup_logging  # noqa: E402
from coupling_dist.components.trainer import Trainer  # noqa: E402
from coupling_dist.config import RunConfig, TrainConfig  # noqa: E402

DIM = 8


class ToyLoader:
    """ShardLoader-like: global batch ``step`` is a pure function of (seed, step); rank slices."""

    def __init__(self, global_batch: int, seed: int, rank: int, world: int):
        self.B, self.seed, self.rank, self.world, self.step = global_batch, seed, rank, world, 0
        self.w_true = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(1234))

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
            x = torch.randn(self.B, DIM, generator=g)
            y = x @ self.w_true + 0.05 * torch.randn(self.B, 1, generator=g)
            n = self.B // self.world
            sl = slice(self.rank * n, (self.rank + 1) * n)
            self.step += 1
            yield {"x": x[sl], "y": y[sl], "mask": torch.ones(n, 4, dtype=torch.uint8)}

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class ToyTask:
    def __init__(self, kill_at: int = -1, sleep: float = 0.0, random: bool = True):
        self.kill_at, self.sleep, self.random = kill_at, sleep, random

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1 if self.random else 0.0),
                             nn.Linear(32, 1))

    def loss(self, model, batch, step):
        if step == self.kill_at and D.rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash in the middle of a step
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"]
        if self.random:  # draws from the torch RNG every step (dropout too)
            x = x + 0.01 * torch.randn_like(x)
        err = model(x) - batch["y"]
        mse = err.pow(2).mean()
        return mse, {"mae": err.abs().mean().detach()}

    def eval_metrics(self, model, batch):
        return {"mse": (model(batch["x"]) - batch["y"]).pow(2).mean()}

    def flops_per_sample(self):
        return {"student": 6.0 * (DIM * 32 + 32), "teacher": 0.0}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--ckpt", type=int, default=4)
    p.add_argument("--keep", type=int, default=5)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--resume", default="auto")
    p.add_argument("--no-random", action="store_true", help="no dropout/noise (compare across world sizes)")
    p.add_argument("--ds-enospc", default=None, help="STEP:RANK: DeepSpeed's own file write fails with ENOSPC "
                                                      "on that rank when saving that step's checkpoint")
    a = p.parse_args()
    info = D.init_distributed()
    setup_logging(a.dir, info["rank"])
    cfg = TrainConfig(steps=a.steps, batch_size=8, lr=a.lr, warmup_steps=2, zero_stage=a.zero, ckpt_interval=a.ckpt,
                      keep_last=a.keep, eval_interval=4, eval_batches=2, ema_decay=a.ema, resume=a.resume,
                      peak_flops=1e12)
    run = RunConfig(dir=a.dir, log_interval=1, progress=False)
    train = ToyLoader(cfg.batch_size, 0, D.rank(), D.world_size())
    held = ToyLoader(cfg.batch_size, 1, D.rank(), D.world_size())
    trainer = Trainer(cfg, ToyTask(a.kill_at, a.sleep, not a.no_random), train, a.dir, heldout_loader=held, run=run, stage="toy")
    if a.ds_enospc:
        step, rank = (int(x) for x in a.ds_enospc.split(":"))
        ce = trainer.engine.checkpoint_engine
        real = ce.save

        def save(state_dict, path, *args, **kw):
            if D.rank() == rank and f"step_{step:08d}.tmp" in str(path) and "optim" in os.path.basename(str(path)):
                import errno

                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(state_dict, path, *args, **kw)

        ce.save = save
    result = trainer.fit()
    weights, ema = trainer.full_state_dict(), trainer.ema_state_dict()
    if D.is_main():
        torch.save({"weights": weights, "ema": ema, "step": result.step}, os.path.join(a.dir, "final.pt"))
    trainer.close()
    return result.exit_code


if __name__ == "__main__":
    from coupling_dist.components.dist import exit_on_peer_failure, mark_failed, set_exit_status
    from coupling_dist.components.preflight import InputError

    try:
        code = exit_on_peer_failure(main)
    except InputError as e:  # what cli.run_entry does: one line, status 2
        mark_failed()
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    else:
        set_exit_status(code)
    raise SystemExit(code)
