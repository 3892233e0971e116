"""Sample quality on a grammar with long-range constraints: does the trained pipeline generate?

    python tools/bench_quality.py [--out runs/bench_quality] [--quick] [--no-p2]

Trains the real pipeline (``python -m coupling_dist.<stage>`` for preprocess, stage_a, pair_store,
stage_b, sample: DeepSpeed, the shard store, the samplers) on sentences of the agreement grammar of
``tools/grammar_fixtures.py`` (GPT-2 tokenizer, one token per word, compact vocabulary, T = 20) and
scores samples with the grammar's exact checker, side by side:

- one-step samples of the Stage B generator (greedy and tau = 1 at latent scale 0.7, greedy at 0.5 and 0.8);
- few-step P2-self samples (K = 4, 8) of a masked denoiser trained on the same pairs (unless --no-p2);
- Stage-A-only samples: z ~ N(0, s^2 I) -> inverse flow -> Stage A decoder (what the coupling
  itself generates; Stage B learns to invert the same pairs);
- the factorized baseline: every position drawn from the data's per-position marginals (Prop. 1);
- held-out data.
Columns: valid, distinct, valid-and-distinct, novel (valid ones not in the training set), per
constraint (tense = first..last word, agree = subject..verb across the clause, bracket), no-EOS,
unigram entropy (data: about 3.42 nats). The learning curve is one-step validity vs Stage B step
(Stage B resumed in chunks under a constant learning rate, so the chunks are one run), printed and
drawn to ``<out>/learning_curve.png``; ``<out>/results.json`` holds everything.

The recipe is the one docs/QUALITY_RESEARCH.md arrived at: Stage A learns a token embedding
(``encoder.model: null``), latent width 4, sigma 0.2, lambda_flow 0.5 -> 1 over 5 % (Eq. 1's
weights), lambda_KL 2.5e-4, RealNVP 8 couplings with the MLP conditioner over the whole [20 x 4]
latent (hidden 512, 2 layers; ``--flow-conditioner transformer`` gives the 8 x 64 transformer
conditioner it replaced), decoder 128 x 3; Stage B is the composite generator D(NF^-1(z))
warm-started from Stage A (``stage_b.model.kind: composite``) without latent mixing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import grammar_fixtures as G  # noqa: E402

GREEDY_TOP_P = 1e-6  # the nucleus of the single most likely token: argmax decoding
# Stage A's flow by --flow-conditioner: the MLP conditioner over the whole [20 x 4] latent (the
# recipe), or the transformer conditioner it replaced (docs/QUALITY_RESEARCH.md, finding 12)
FLOWS = {"mlp": {"kind": "realnvp", "conditioner": "mlp", "layers": 8, "hidden": 512, "depth": 2, "scale_bound": 2.0},
         "transformer": {"kind": "realnvp", "layers": 8, "hidden": 64, "depth": 1, "heads": 4, "scale_bound": 2.0}}


def config(out: str, a) -> dict:
    sa_steps, b_total = a.stage_a_steps, a.stage_b_steps
    return {
        "run": {"dir": out, "name": "bench_quality", "seed": a.seed, "log_interval": 200},
        "data": {"corpus": os.path.join(out, "corpus.txt"), "format": "text", "tokenizer": "asset:gpt2-tokenizer",
                 "seq_len": 20, "shard_size": 2048, "heldout_fraction": a.heldout_fraction, "vocab": "corpus"},
        "encoder": {"model": None},
        "ray": {"num_workers": 1, "num_cpus_per_worker": 1},
        "stage_a": {
            "latent_dim": 4, "noise_scale": 0.2, "lambda_kl": 2.5e-4, "lambda_flow_start": 0.5,
            "lambda_flow_end": 1.0, "flow_anneal_fraction": 0.05,
            "flow": FLOWS[a.flow_conditioner],
            "decoder": {"width": 128, "depth": 3, "heads": 4, "ffn": 256},
            "train": {"steps": sa_steps, "batch_size": 32, "lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": min(50, sa_steps // 10),
                      "ema_decay": 0.999,
                      "zero_stage": 1, "ckpt_interval": max(sa_steps // 3, 1), "eval_interval": max(sa_steps // 6, 1)}},
        "pair_store": {"multiplicity": 1, "dtype": "float32", "batch_size": 512},
        "stage_b": {
            "model": {"kind": a.stage_b_kind}, "kd": {"teacher": None}, "latent_mix_prob": 0.0,
            "train": {"steps": b_total, "batch_size": 32, "lr": 3e-4, "schedule": "constant", "warmup_steps": 0,
                      "ema_decay": None,  # the live weights: a 300-step fine-tune, and the curve reads each chunk
                      "zero_stage": 1, "ckpt_interval": a.curve_every, "eval_interval": a.curve_every}},
        "sample": {"num_samples": a.samples, "batch_size": 500, "top_p": 1.0, "temperature": 1.0},
    }


def run(module: str, cfg_path: str, *overrides: str, log=None) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", f"coupling_dist.{module}", "--config", cfg_path, *overrides]
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"{module} failed (exit {rc}); see {log}")
    return time.time() - t0


def read_samples(path: str) -> list[tuple[str, bool]]:
    with open(path, encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return [(r["text"], bool(r["eos"])) for r in recs]


def sample_and_score(cfg_path: str, out: str, tag: str, train: set, log: str, **settings) -> dict:
    path = os.path.join(out, "samples", f"{tag}.jsonl")
    over = [f"sample.out={path}"] + [f"sample.{k}={v}" for k, v in settings.items()]
    run("sample", cfg_path, *over, log=log)
    res = G.score(read_samples(path), train)
    res["settings"] = settings
    return res


def fmt(v) -> str:
    return "   -" if v is None else f"{100 * v:5.1f}"


def print_table(rows: dict) -> None:
    cols = ("valid", "distinct", "valid_distinct", "novel_of_valid", "tense", "agree", "bracket", "no_eos")
    print(f"{'series':34s} " + " ".join(f"{c[:8]:>8s}" for c in cols) + "  unigram H")
    for name, r in rows.items():
        print(f"{name:34s} " + " ".join(f"{fmt(r.get(c)):>8s}" for c in cols) + f"  {r['unigram_entropy']:.2f}")


def plot_curve(curve: list[dict], ref: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("greedy", "o-"), ("tau1", "s--")):
        ax.plot([c["step"] for c in curve], [100 * c[key] for c in curve], style, label=f"one-step ({key})")
    for name, r, style in (("Stage A only (greedy)", ref["stage_a"], ":"), ("factorized", ref["factorized"], "-.")):
        ax.axhline(100 * r["valid"], linestyle=style, color="gray", label=name)
    ax.set_xlabel("Stage B step (0 = warm start)")
    ax.set_ylabel("valid samples (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("grammar benchmark: one-step validity vs Stage B step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_quality"))
    p.add_argument("--sentences", type=int, default=8000)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--stage-a-steps", type=int, default=15000)
    p.add_argument("--stage-b-steps", type=int, default=300)
    p.add_argument("--stage-b-kind", default="composite", choices=("composite", "onestep"))
    p.add_argument("--flow-conditioner", default="mlp", choices=tuple(FLOWS))
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument("--p2-steps", type=int, default=1500, help="masked denoiser steps for the P2-self rows")
    p.add_argument("--no-p2", action="store_true")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--scale", type=float, default=0.7, help="latent scale of the headline rows")
    p.add_argument("--also-scales", type=float, nargs="*", default=[0.5, 0.8],
                   help="latent scales of extra greedy one-step rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a plumbing check: tiny step counts")
    a = p.parse_args()
    if a.quick:
        a.sentences, a.stage_a_steps, a.stage_b_steps, a.curve_every, a.p2_steps, a.samples = 600, 60, 40, 20, 40, 200
    out = os.path.abspath(a.out)
    if os.path.exists(os.path.join(out, "results.json")):
        raise SystemExit(f"{out} holds a finished benchmark; pass another --out")
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    log = os.path.join(out, "bench.log")
    t_start = time.time()
    sentences = G.corpus(a.sentences, seed=a.seed)
    with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(sentences) + "\n")
    import yaml

    cfg_path = os.path.join(out, "config.yaml")
    with open(cfg_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config(out, a), fh, sort_keys=False)
    times = {}
    for stage in ("preprocess", "stage_a", "pair_store"):
        times[stage] = run(stage, cfg_path, log=log)
        print(f"{stage}: {times[stage]:.0f} s", flush=True)
    heldout = held_out_sentences(out)
    train = set(sentences) - set(heldout)

    rows, curve = {}, []
    greedy = {"top_p": GREEDY_TOP_P, "latent_scale": a.scale}
    rows["data (held-out)"] = G.score([(s, True) for s in heldout])
    rows["factorized baseline"] = G.score(G.factorized_baseline(sorted(train), a.samples, a.seed), train)
    rows[f"Stage A only, greedy, s={a.scale}"] = sample_and_score(cfg_path, out, "stage_a", train, log,
                                                                   kind="stage_a", **greedy)
    # Stage B in chunks (constant LR: resuming at each chunk is the same run), scored after each
    t_b = 0.0
    for step in range(a.curve_every, a.stage_b_steps + 1, a.curve_every):
        t_b += run("stage_b", cfg_path, f"stage_b.train.steps={step}", log=log)
        point = {"step": step}
        for key, extra in (("greedy", {"top_p": GREEDY_TOP_P}), ("tau1", {"top_p": 1.0})):
            r = sample_and_score(cfg_path, out, f"onestep_{step}_{key}", train, log, latent_scale=a.scale, **extra)
            point[key] = r["valid"]
            point[f"{key}_distinct"] = r["distinct"]
        curve.append(point)
        print(f"stage_b step {step}: one-step valid {100 * point['greedy']:.1f} % greedy, "
              f"{100 * point['tau1']:.1f} % tau=1 ({t_b:.0f} s)", flush=True)
    times["stage_b"] = t_b
    rows[f"one-step, greedy, s={a.scale}"] = sample_and_score(cfg_path, out, "onestep_greedy", train, log, **greedy)
    rows[f"one-step, tau=1, s={a.scale}"] = sample_and_score(cfg_path, out, "onestep_tau1", train, log,
                                                              latent_scale=a.scale, top_p=1.0)
    for s in a.also_scales:
        if s != a.scale:
            rows[f"one-step, greedy, s={s}"] = sample_and_score(cfg_path, out, f"onestep_greedy_s{s}", train, log,
                                                                top_p=GREEDY_TOP_P, latent_scale=s)
    times["to_one_step_rows"] = time.time() - t_start  # the target's clock: corpus to scored one-step samples
    if not a.no_p2:
        times["stage_b_masked"] = p2_rows(a, out, cfg_path, train, log, rows)
    # the warm start (step 0) is Stage A's own map: the first point of the curve
    curve.insert(0, {"step": 0, "greedy": rows[f"Stage A only, greedy, s={a.scale}"]["valid"],
                     "tau1": sample_and_score(cfg_path, out, "stage_a_tau1", train, log, kind="stage_a",
                                              latent_scale=a.scale, top_p=1.0)["valid"]})
    times["total"] = time.time() - t_start
    print()
    print_table(rows)
    print("\nlearning curve (one-step valid %, greedy / tau=1):",
          ", ".join(f"{c['step']}: {100 * c['greedy']:.1f}/{100 * c['tau1']:.1f}" for c in curve))
    print("times (s):", {k: round(v) for k, v in times.items()})
    plot_curve(curve, {"stage_a": rows[f"Stage A only, greedy, s={a.scale}"],
                       "factorized": rows["factorized baseline"]}, os.path.join(out, "learning_curve.png"))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "curve": curve, "times_s": times, "args": vars(a)}, fh, indent=1)
    print(f"results: {os.path.join(out, 'results.json')}, plot: {os.path.join(out, 'learning_curve.png')}")


def p2_rows(a, out: str, cfg_path: str, train: set, log: str, rows: dict) -> float:
    """A masked denoiser (Algorithm 2) on the same pair store, sampled with P2-self (Algorithm 3)."""
    run_dir = os.path.join(out, "masked")  # its own stage_b/, the shared data and pair store linked in
    os.makedirs(run_dir, exist_ok=True)
    for d in ("data", "stage_a", "pair_store"):
        if not os.path.lexists(os.path.join(run_dir, d)):
            os.symlink(os.path.join(out, d), os.path.join(run_dir, d))
    over = [f"run.dir={run_dir}", f"stage_b.model.kind=masked", "stage_b.model.width=128", "stage_b.model.depth=4",
            "stage_b.model.ffn=256", f"stage_b.train.steps={a.p2_steps}", "stage_b.train.lr=1e-3",
            "stage_b.train.schedule=cosine", "stage_b.train.min_lr_ratio=0.1",
            f"stage_b.train.warmup_steps={min(50, a.p2_steps // 10)}",
            f"stage_b.train.ckpt_interval={a.p2_steps}", f"stage_b.train.eval_interval={a.p2_steps}",
            ]
    t = run("stage_b", cfg_path, *over, log=log)
    for k in (4, 8):
        rows[f"P2-self K={k}, greedy, s={a.scale}"] = sample_and_score(
            cfg_path, out, f"p2_{k}", train, log, export=os.path.join(run_dir, "stage_b", "export"), steps=k,
            top_p=GREEDY_TOP_P, proposal_top_p=GREEDY_TOP_P, latent_scale=a.scale)
    return t


def held_out_sentences(out: str) -> list[str]:
    """The sentences preprocess put in the held-out split, decoded from the shards."""
    import numpy as np

    from coupling_dist.components import assets
    from coupling_dist.data.shards import Manifest, iter_shards

    data = os.path.join(out, "data")
    tok = assets.load_tokenizer("asset:gpt2-tokenizer")
    texts = []
    for split in sorted(set(Manifest.load(data).splits) - {"train"}):
        for samples in iter_shards(data, split, fields=["tokens", "mask"]):
            for rec in samples:
                n = int(np.asarray(rec["mask"]).sum()) - 1  # the real tokens, without the EOS
                texts.append(tok.decode(np.asarray(rec["tokens"])[:n].tolist()).strip())
    return texts

if __name__ == "__main__":
    main()
