"""Stage A and Stage B training steps with the compact vocabulary (``data.vocab: corpus``) vs the
full one, at the demo's shapes.

    python tools/bench_vocab.py [--steps 3] [--warmup 1] [--threads N]

Shapes: ``configs/tiny.yaml`` (seq_len 32, Stage A latent 16 / RealNVP 4 x 64 / decoder 64 x 2,
batch 16; Stage B generator 64 x 2, batch 8, KD from ``tiny:qwen2`` at tau 2), the Qwen2.5
tokenizer, and the compact vocabulary of the demo corpus: the ids of the Lee-corpus sentences
tokenized as preprocess does (ids + EOS, cut at seq_len), plus EOS/pad. Full vocabulary: Stage A's
head spans the tokenizer (151,669), Stage B's the teacher's (151,936); compact: the corpus ids
(Stage B's head padded to a multiple of 1024, as the pre-flight does).

Each step goes through the real task code (``StageATask.loss``, ``StageBTask._loss``: target
mapping, teacher-row restriction, chunked CE + KD) plus backward and an AdamW step, on batches
whose tokens are drawn from the corpus ids. Every (stage, vocabulary) variant runs in its own
subprocess so its peak RSS is its own; the summary prints compact / full ratios from this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_stage_b import rss_mb  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def corpus_rows(tok, corpus: str, T: int) -> list[list[int]]:
    """Every sentence of a one-per-line corpus as preprocess stores its ids: ids + EOS, cut at T."""
    from coupling_dist.components import assets

    with open(assets.resolve(corpus), encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    return [(list(row) + [tok.eos_token_id])[:T] for row in tok(lines, add_special_tokens=False)["input_ids"]]


def corpus_ids(cfg) -> list[int]:
    """The ids preprocess would store for the demo corpus (every split), plus EOS and pad."""
    from coupling_dist.components import assets

    tok = assets.load_tokenizer(cfg.data.tokenizer)
    ids = {tok.eos_token_id, tok.pad_token_id}
    for row in corpus_rows(tok, cfg.data.corpus, cfg.data.seq_len):
        ids.update(row)
    return sorted(ids)


def batches(ids: list[int], B: int, T: int, n: int, **fields) -> list[dict]:
    """Tokens from ``ids`` with lengths T/2..T (EOS-padded tails are ids too), plus random fields."""
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(ids)
    out = []
    for _ in range(n):
        tokens = pool[torch.randint(0, len(ids), (B, T), generator=g)]
        mask = torch.arange(T)[None] < torch.randint(T // 2, T + 1, (B, 1), generator=g)
        out.append(dict(tokens=tokens, mask=mask, **{k: torch.randn(B, *shape, generator=g) for k, shape in fields.items()}))
    return out


def stage_a_step(cfg, vocab, ids):
    from transformers import AutoConfig

    from coupling_dist.components import assets
    from coupling_dist.components.assets import tokenizer_identity
    from coupling_dist.stages.stage_a.task import StageATask

    feat = int(AutoConfig.from_pretrained(assets.resolve(cfg.encoder.model), local_files_only=True).hidden_size)
    V = vocab.size if vocab else int(tokenizer_identity(cfg.data.tokenizer)["vocab_size"])
    task = StageATask(cfg, feat, V, seq_len=cfg.data.seq_len, vocab=vocab)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(ids, cfg.stage_a.train.batch_size, cfg.data.seq_len, 4, features=(cfg.data.seq_len, feat))

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, data[i % len(data)], i)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, V


def stage_b_step(cfg, vocab, ids):
    from transformers import AutoConfig

    from coupling_dist.components import assets
    from coupling_dist.stages.stage_b.task import StageBTask

    path = assets.resolve(cfg.stage_b.kd.teacher)
    V = -(-vocab.size // 1024) * 1024 if vocab else int(AutoConfig.from_pretrained(path, local_files_only=True).vocab_size)
    T, d = cfg.data.seq_len, cfg.stage_a.latent_dim
    info = {"latent_dim": d, "seq_len": T, "vocab_size": V, "mask_token_id": None, "teacher": {"path": path},
            "vocab": vocab}
    task = StageBTask(cfg, info)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(ids, cfg.stage_b.train.batch_size, T, 4, z=(1, T, d))

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss, _ = task._loss(model, data[i % len(data)], i, train=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, V


def run_variant(a) -> dict:
    from coupling_dist.components.assets import tokenizer_identity
    from coupling_dist.config import load_config
    from coupling_dist.data.vocab import CompactVocab

    torch.set_num_threads(a.threads)
    cfg = load_config(DEMO, ["run.wandb.mode=disabled"])
    ids = corpus_ids(cfg)
    full = int(tokenizer_identity(cfg.data.tokenizer)["vocab_size"])
    vocab = CompactVocab(ids, full) if a.vocab == "corpus" else None
    step, V = (stage_a_step if a.stage == "stage_a" else stage_b_step)(cfg, vocab, ids)
    base = rss_mb()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step(i)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return {"stage": a.stage, "vocab": a.vocab, "head_rows": V, "corpus_ids": len(ids),
            "step_s": statistics.median(times), "peak_rss_mb": rss_mb(), "step_peak_increase_mb": rss_mb() - base}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--stage", choices=["stage_a", "stage_b"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", choices=["full", "corpus"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        print(json.dumps(run_variant(a)))
        return 0
    res = {}
    for stage in ("stage_a", "stage_b"):
        for vocab in ("full", "corpus"):
            args = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--vocab", vocab,
                    "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
            out = subprocess.run(args, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{stage}/{vocab} failed:\n{out.stderr[-3000:]}")
                return 1
            r = res[stage, vocab] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{stage} {vocab:6s} head {r['head_rows']:6d} rows | step {r['step_s'] * 1e3:7.1f} ms (median of "
                  f"{a.steps}) | peak RSS {r['peak_rss_mb']:.0f} MB (step increase {r['step_peak_increase_mb']:.0f} MB)")
    print(f"demo corpus: {res['stage_a', 'corpus']['corpus_ids']} distinct ids; threads {a.threads}")
    for stage in ("stage_a", "stage_b"):
        c, f = res[stage, "corpus"], res[stage, "full"]
        print(f"ratios {stage} (same run), compact / full: step time {c['step_s'] / f['step_s']:.3f}x "
              f"(speed-up {f['step_s'] / c['step_s']:.1f}x), peak RSS {c['peak_rss_mb'] / f['peak_rss_mb']:.2f}x, "
              f"step memory increase {c['step_peak_increase_mb'] / max(f['step_peak_increase_mb'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
