"""Stage B training step at the paper's shape: chunked CE + KD vs the same step written naively.

    python tools/bench_stage_b.py [--batch 4] [--steps 2] [--seq 128] [--width 768] [--depth 12]
                                  [--heads 12] [--ffn 2048] [--vocab 151936] [--latent 256]
                                  [--teacher-layers 2] [--chunk-rows 128] [--chunk-vocab 151936] [--rounds 2]

Student: the Stage B generator (768 x 12, 12 heads, FFN 2048, V 151,936, T 128). Teacher: a random
Qwen2 with the Qwen2.5-0.5B widths (hidden 896, 14 heads / 2 KV heads, FFN 4864) at a reduced
depth (``--teacher-layers``; 24 in the paper) so that a step fits a CPU. One step = student
forward, teacher trunk forward (no grad), CE + KD (tau 2), backward, AdamW step.

- ``chunked``: ``losses.kd_loss.sequence_loss`` on the hidden states and head weights (never
  materialises [B, T, V] logits for the batch);
- ``naive``: full fp32 student and teacher logits, ``log_softmax`` / ``cross_entropy``, plain autograd.

Each variant runs in its own subprocess (so peak RSS is its own); both report the same nominal
FLOPs (student 3x forward matmuls + teacher forward), achieved FLOP/s and its fraction of this
machine's fp32 dense GEMM FLOP/s measured in this run, step time and peak memory. The summary
prints the two same-run ratios: chunked / naive step time and peak-memory increase.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build(a):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from coupling_dist.config import GeneratorConfig
    from coupling_dist.models.generator import Generator
    from coupling_dist.models.teacher import teacher_flops_per_token

    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(width=a.width, depth=a.depth, heads=a.heads, ffn=a.ffn, attention="sdpa"),
                    a.latent, a.seq, a.vocab)
    tconf = Qwen2Config(vocab_size=a.vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=a.teacher_layers,
                        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    teacher = Qwen2ForCausalLM(tconf).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    flops = a.batch * (gen.flops_per_sample(a.seq) + teacher_flops_per_token(teacher, a.seq, a.vocab) * a.seq)
    return gen, teacher, flops


def run_variant(a) -> dict:
    from coupling_dist.components.metrics import measure_gemm_flops
    from coupling_dist.losses.kd_loss import naive_sequence_loss, sequence_loss

    torch.set_num_threads(a.threads)
    gemm = [measure_gemm_flops(torch.device("cpu"), torch.float32, use_cache=False)]  # bracket the steps
    gen, teacher, flops = build(a)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
    g = torch.Generator().manual_seed(1)
    z = torch.randn(a.batch, a.seq, a.latent, generator=g)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    mask = torch.ones(a.batch, a.seq, dtype=torch.bool)
    mask[0, a.seq // 2:] = False
    base = rss_mb()

    def step():
        opt.zero_grad(set_to_none=True)
        if a.variant == "chunked":
            h = gen.hidden(z)
            with torch.no_grad():
                th = teacher.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            loss, ce, kd = sequence_loss(h, tokens, mask, gen.head.weight, teacher_hidden=th,
                                         teacher_weight=teacher.lm_head.weight, kd_mask=mask, temperature=2.0,
                                         chunk_rows=a.chunk_rows, chunk_vocab=a.chunk_vocab)
        else:
            logits = gen(z)
            with torch.no_grad():
                tl = teacher(input_ids=tokens, attention_mask=mask.long()).logits
            loss, ce, kd = naive_sequence_loss(logits, tokens, mask, teacher_logits=tl, kd_mask=mask, temperature=2.0)
        loss.backward()
        opt.step()
        return float(loss.detach())

    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    gemm.append(measure_gemm_flops(torch.device("cpu"), torch.float32, use_cache=False))
    return {"variant": a.variant, "step_s": t, "flops_per_step": flops, "flops_per_s": flops / t,
            "gemm_flops": max(gemm), "peak_rss_mb": rss_mb(), "step_peak_increase_mb": rss_mb() - base, "loss_first": losses[0]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=128)
    p.add_argument("--chunk-vocab", type=int, default=151936)
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per variant")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variant", choices=["chunked", "naive"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a)))
        return 0

    from coupling_dist.components.metrics import measure_gemm_flops

    torch.set_num_threads(a.threads)
    peak = measure_gemm_flops(torch.device("cpu"), torch.float32, use_cache=False)  # measured now, not cached
    print(f"shape: student {a.width}x{a.depth} (heads {a.heads}, ffn {a.ffn}), V {a.vocab}, T {a.seq}, batch {a.batch}; "
          f"teacher Qwen2 896-wide x {a.teacher_layers} layers; threads {a.threads}")
    res, gemms = {}, [peak]
    # rounds alternate the variants (chunked, naive, chunked, ...) so that drift in the shared
    # machine's speed hits both; each variant keeps its fastest round
    for _ in range(a.rounds):
        for v in ("chunked", "naive"):
            args = [sys.executable, os.path.abspath(__file__), "--variant", v] + [
                x for k, val in vars(a).items() if k != "variant"
                for x in (f"--{k.replace('_', '-')}", str(val))]
            out = subprocess.run(args, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{v} failed:\n{out.stderr[-3000:]}")
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gemms.append(r["gemm_flops"])
            if v not in res or r["step_s"] < res[v]["step_s"]:
                res[v] = r
    # the machine's GEMM rate drifts (shared cores): the peak is the best of the measurements taken
    # before and after each variant's steps, so the fractions below are conservative
    peak = max(gemms)
    print(f"fp32 GEMM peak (this run, best of {2 * len(gemms) - 1} measurements): {peak / 1e9:.1f} GFLOP/s; "
          f"each variant's fastest of {a.rounds} rounds")
    for v, r in res.items():
        print(f"{v:8s} step {r['step_s']:.2f} s | {r['flops_per_s'] / 1e9:.1f} GFLOP/s = {r['flops_per_s'] / peak:.1%} of "
              f"GEMM peak | peak RSS {r['peak_rss_mb']:.0f} MB (step increase {r['step_peak_increase_mb']:.0f} MB) "
              f"| loss {r['loss_first']:.4f}")
    c, n = res["chunked"], res["naive"]
    print(f"ratios (same run): chunked/naive step time {c['step_s'] / n['step_s']:.2f}x, "
          f"speed-up {n['step_s'] / c['step_s']:.2f}x; step memory increase chunked/naive "
          f"{c['step_peak_increase_mb'] / max(n['step_peak_increase_mb'], 1):.2f}x; "
          f"MFU chunked {c['flops_per_s'] / peak:.1%} vs naive {n['flops_per_s'] / peak:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
