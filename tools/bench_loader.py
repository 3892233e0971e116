"""Loader throughput vs the rate a Stage B step consumes samples, at the demo and paper shapes.

    python tools/bench_loader.py [--paper-steps 2] [--device cpu|cuda]

For each shape a synthetic pair-store shard set (``z`` [1, T, d] float16, ``tokens``, ``mask``,
written in the real format) is read by ``ShardLoader`` (0 and 2 DataLoader workers, world 1,
every field decoded and checked). The consumer is a forward+backward (+ AdamW step) of a plain
PyTorch bidirectional transformer of the Stage B shape (latent d -> width, position embedding,
``nn.TransformerEncoder``, vocabulary head V = 151,936, cross-entropy), timed over a few steps.
Printed: samples/s of each and the ratio loader / step (> 1 means the loader is not the
bottleneck). Shapes: demo width 64 depth 2 heads 4 ffn 128 T 32 d 16 batch 16; paper width 768
depth 12 heads 12 ffn 2048 T 128 d 256 batch 32 (on CPU the paper step uses a smaller batch
and is reported per sample: its time is ~linear in the batch).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coupling_dist.data import shards as S  # noqa: E402
from coupling_dist.data.loader import ShardLoader  # noqa: E402

V = 151936
SHAPES = {
    "demo": dict(width=64, depth=2, heads=4, ffn=128, T=32, d=16, batch=16),
    "paper": dict(width=768, depth=12, heads=12, ffn=2048, T=128, d=256, batch=32),
}


def make_pairs(out: str, n: int, T: int, d: int, shard_size: int = 256) -> None:
    rng = np.random.default_rng(0)
    recs = []
    for j in range(0, n, shard_size):
        samples = []
        for i in range(j, min(n, j + shard_size)):
            L = int(rng.integers(5, T + 1))
            tok = np.zeros(T, np.int32)
            tok[:L] = rng.integers(0, V, L)
            mask = np.zeros(T, np.uint8)
            mask[:L] = 1
            samples.append({"__key__": f"{i:09d}", "z": rng.standard_normal((1, T, d)).astype(np.float16),
                            "tokens": tok, "mask": mask})
        rec = S.write_shard(os.path.join(out, S.shard_name("train", j // shard_size)), samples)
        rec["split"] = "train"
        recs.append(rec)
    fields = {"z": {"dtype": "float16", "shape": [1, T, d]}, "tokens": {"dtype": "int32", "shape": [T]},
              "mask": {"dtype": "uint8", "shape": [T]}}
    S.Manifest.for_pairs(out, recs, fields=fields, seq_len=T, tokenizer={}, encoder={}).save(out)


def loader_rate(d: str, batch: int, workers: int, steps: int) -> float:
    loader = ShardLoader(d, "train", batch, 0, 0, 1, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up and first indexing are not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += b["tokens"].shape[0]
    return n / (time.perf_counter() - t0)


class Generator(nn.Module):
    def __init__(self, width, depth, heads, ffn, T, d):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.pos = nn.Parameter(torch.zeros(T, width))
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, V)

    def forward(self, z):
        return self.head(self.body(self.inp(z) + self.pos))


def step_rate(shape: dict, batch: int, steps: int, device: str) -> float:
    torch.manual_seed(0)
    m = Generator(shape["width"], shape["depth"], shape["heads"], shape["ffn"], shape["T"], shape["d"]).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    z = torch.randn(batch, shape["T"], shape["d"], device=device)
    y = torch.randint(0, V, (batch, shape["T"]), device=device)

    def one():
        loss = nn.functional.cross_entropy(m(z).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--paper-steps", type=int, default=2)
    ap.add_argument("--paper-cpu-batch", type=int, default=4)
    ap.add_argument("--loader-steps", type=int, default=60)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_loader.")
    rows = []
    try:
        for name, sh in SHAPES.items():
            d = os.path.join(tmp, name)
            make_pairs(d, 2048, sh["T"], sh["d"])
            rates = {w: loader_rate(d, sh["batch"], w, a.loader_steps) for w in (0, 2)}
            batch = sh["batch"] if (a.device == "cuda" or name == "demo") else a.paper_cpu_batch
            steps = 10 if name == "demo" else a.paper_steps
            rows.append((name, sh, rates, step_rate(sh, batch, steps, a.device), batch))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nloader vs Stage B step consumption ({a.device}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})")
    print(f"{'shape':<7}{'step batch':>11}{'step samples/s':>16}{'loader w=0':>12}{'ratio':>8}{'loader w=2':>12}{'ratio':>8}")
    for name, sh, rates, step, batch in rows:
        print(f"{name:<7}{batch:>11}{step:>16.1f}{rates[0]:>12.1f}{rates[0] / step:>8.1f}{rates[2]:>12.1f}"
              f"{rates[2] / step:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
