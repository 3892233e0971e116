"""The data of reward fine-tuning: no data set, only (z, y) draws.

``LatentLoader`` follows the ShardLoader API the Trainer expects (iteration yields this rank's
slice of global batch ``loader.step``; ``step``, ``state_dict``, ``load_state_dict``). Global batch
``s`` is a pure function of (run.seed, s, salt): z ~ N(0, latent_scale^2 I) and y drawn from one
``torch.Generator`` seeded by them, and each data-parallel rank takes its slice of it. So a resumed
run replays the same batches bit for bit (the loader position is the global step), and even a run
resumed at another data-parallel size sees the same global batches.
"""
from __future__ import annotations

import torch

MIX = 2**63 - 1


def batch_seed(seed: int, step: int, salt: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(salt) * 104_729 + 17) % MIX


def draw_labels(B: int, num_classes: int, how: str, step: int, g: torch.Generator) -> torch.Tensor:
    """y [B] for global batch ``step``: "balanced" = (global sample index) mod num_classes (every
    class equally often over consecutive batches), "uniform" = uniform draws from ``g``."""
    if how == "balanced":
        return (torch.arange(B, dtype=torch.long) + step * B) % num_classes
    if how == "uniform":
        return torch.randint(0, num_classes, (B,), generator=g)
    raise ValueError(f"finetune.labels: unknown label sampling {how!r}")


class LatentLoader:
    def __init__(self, global_batch: int, positions: int, latent_dim: int, num_classes: int, labels: str,
                 latent_scale: float, seed: int, dp_rank: int, dp_world: int, salt: int = 0):
        if global_batch % dp_world:
            raise ValueError(f"batch size {global_batch} is not divisible by the data-parallel size {dp_world}")
        self.B, self.P, self.d = int(global_batch), int(positions), int(latent_dim)
        self.num_classes, self.labels, self.scale = int(num_classes), labels, float(latent_scale)
        self.seed, self.salt, self.dp_rank, self.dp_world = int(seed), int(salt), int(dp_rank), int(dp_world)
        self.step = 0

    def global_batch(self, step: int) -> dict:
        g = torch.Generator().manual_seed(batch_seed(self.seed, step, self.salt))
        z = torch.randn(self.B, self.P, self.d, generator=g) * self.scale
        y = draw_labels(self.B, self.num_classes, self.labels, step, g)
        return {"z": z, "labels": y}

    def __iter__(self):
        while True:
            full = self.global_batch(self.step)
            n = self.B // self.dp_world
            sl = slice(self.dp_rank * n, (self.dp_rank + 1) * n)
            self.step += 1
            yield {k: v[sl] for k, v in full.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "salt": self.salt}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
