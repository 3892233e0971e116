"""Stage B step with the cached top-k KD teacher vs the live teacher, at the demo's shape.

    python tools/bench_kd_cache.py [--config configs/tiny.yaml] [--topk 64] [--steps 5] [--warmup 1]

Sizes come from the config (student ``stage_b.model``, ``stage_a.latent_dim``, ``data.seq_len``,
``stage_b.train.batch_size``, the teacher ``stage_b.kd.teacher`` and its vocabulary, KD temperature
and chunking). One step = student forward, [live: teacher trunk forward (no grad)], CE + KD through
``losses.kd_loss.sequence_loss``, backward, AdamW step -- what ``StageBTask.loss`` does. The cached
variant reads the top-k (``models.teacher.topk_logprobs``, computed once before timing, as the
pair store would have written it). Both variants run in this process, alternating step by step so
that drift in the shared machine's speed hits both; the summary prints the same-run ratio of
median step times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from coupling_dist.components import assets
    from coupling_dist.config import load_config
    from coupling_dist.losses.kd_loss import sequence_loss
    from coupling_dist.models.generator import Generator
    from coupling_dist.components.assets import load_causal_lm
    from coupling_dist.models.teacher import topk_logprobs, trunk_hidden

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(root, "configs", "tiny.yaml"))
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, ["run.wandb.mode=disabled"])
    kd, B, T, d = cfg.stage_b.kd, cfg.stage_b.train.batch_size, cfg.data.seq_len, cfg.stage_a.latent_dim
    teacher = load_causal_lm(assets.resolve(kd.teacher), torch.device("cpu"))
    head_t = teacher.get_output_embeddings().weight
    V = head_t.shape[0]
    torch.manual_seed(0)
    gen = Generator(cfg.stage_b.model, d, T, V)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, T, d, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T // 2:] = False
    cache = topk_logprobs(teacher, tokens, mask, a.topk, kd.temperature)
    common = dict(kd_mask=mask, temperature=kd.temperature, lambda_kd=kd.weight, chunk_rows=kd.chunk_positions,
                  chunk_vocab=kd.chunk_vocab)

    def step(variant: str) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        h = gen.hidden(z)
        if variant == "live":
            with torch.no_grad():
                th = trunk_hidden(teacher, tokens, mask)
            loss = sequence_loss(h, tokens, mask, gen.head.weight, teacher_hidden=th, teacher_weight=head_t, **common)[0]
        else:
            loss = sequence_loss(h, tokens, mask, gen.head.weight, teacher_topk=cache, **common)[0]
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict = {"live": [], "cached": []}
    for i in range(a.warmup + a.steps):
        for v in ("live", "cached") if i % 2 == 0 else ("cached", "live"):
            dt = step(v)
            if i >= a.warmup:
                times[v].append(dt)
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    print(f"shape ({a.config}): student {cfg.stage_b.model.width}x{cfg.stage_b.model.depth}, V {V}, T {T}, batch {B}, "
          f"teacher {kd.teacher} (hidden {teacher.config.hidden_size} x {teacher.config.num_hidden_layers} layers), "
          f"top-k {a.topk}, chunk_vocab {kd.chunk_vocab}; threads {a.threads}; median of {a.steps} steps each")
    print(f"live teacher step {live * 1e3:.0f} ms | cached top-k step {cached * 1e3:.0f} ms")
    print(f"ratio (same run): cached/live step time {cached / live:.2f}x, speed-up {live / cached:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
