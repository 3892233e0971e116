"""The evaluation of domains whose metric is ``classifier_frechet`` (binary images, DNA).

The paper scores MNIST-Binary by torchmetrics' FID with Inception features (Appendix G.1) and DNA
by the Fréchet distance in a frozen benchmark classifier's embedding (FBD, G.2). Inception's weights cannot be
fetched here, so the feature space is a small classifier of the domain (``domain.feature_net``,
``evaluation/feature_net.py``) trained by this stage on the *training* shards' labels
(``evaluate.classifier_steps`` AdamW steps, seed ``run.seed``; cached in ``run.dir/eval/classifier``
and reused while the shard set, steps and seed are the same); the distance itself is torchmetrics'
(``evaluation/frechet.py``). Its accuracy on the held-out shards is reported. When Inception's
weights are present locally, the standard FID is reported too (``fid_inception``, else null).

Rows (every one against the same reference: up to ``evaluate.reference_samples`` training items,
the paper's "against the training set"):
- ``file``: the samples file (``run.dir/sample/samples.jsonl``) when present;
- ``sweep``: the Stage B export at every (latent scale, top-p, temperature) of the evaluate
  section, ``evaluate.num_samples`` one-step samples (seed ``sample.seed``);
- ``stage_a``: the same settings for the Stage-A-only sampler (z -> inverse flow -> Stage A
  decoder; ``evaluate.stage_a_series``), the paper's flow-reverse diagnostic;
- ``factorized``: every position drawn independently from the training marginals (per-pixel
  Bernoulli for binary images, per-position base frequencies for DNA; ``evaluate.factorized_series``);
- ``reference``: real held-out items (at most ``evaluate.num_samples``): the distance real data
  reaches at this sample size, the floor of the column.

Per row: ``fd_classifier``, the classifier's mean top-class probability on the samples
(``confidence``), the fraction it classifies with probability > 0.9 (``confident_frac``), the
entropy of its predicted classes (``class_entropy``, nats; ln 10 = 2.30 for balanced digits), and
for the held-out row its accuracy, and the domain's own columns against the same reference
(``domain.extra_metrics``; DNA: k-mer spectrum JS per k and mean, GC mean / std / Wasserstein-1).
The classifier has ``domain.n_classes`` outputs, or max label + 1 of the training shards. Outputs in ``run.dir/eval``: results.json, results.csv,
results.md (the table), a picture per series (``grids/<name>.png``, via ``domain.write_grid``) and
the domain's figures of the rows (``domain.write_eval_figures``; DNA: kmer_js.png).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import numpy as np
import torch

from ...components import paths as run_paths
from ...components.atomic import write_jsonl, write_text
from ...components.logging import get_logger
from ...components.preflight import InputError, check_export
from ...data.shards import Manifest, iter_shards
from ...evaluation import report
from ...evaluation.feature_net import build_feature_net, load_feature_net, save_feature_net, train_feature_net
from ...evaluation.frechet import frechet_distance, inception_fid
from ...sampling import generate as G
from ...sampling.p2_self import sample_any

log = get_logger("evaluate")
COLUMNS = ["name", "kind", "temperature", "latent_scale", "top_p", "num_samples", "fd_classifier", "fid_inception",
           "confidence", "confident_frac", "class_entropy", "accuracy", "sample_seconds"]
CONFIDENT = 0.9


def read_split(cfg, domain, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, T] in the classifier's order, labels [N]) of one split of the shard set."""
    toks, labels = [], []
    for samples in iter_shards(run_paths.data_dir(cfg), split, fields=["tokens", "label"]):
        toks += [s["tokens"] for s in samples]
        labels += [int(np.asarray(s["label"]).reshape(-1)[0]) for s in samples]
    if not toks:
        return np.zeros((0, cfg.data.seq_len), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    return domain.feature_tokens(np.stack(toks).astype(np.int64)), np.asarray(labels, dtype=np.int64)


def classifier(cfg, domain, tokens: np.ndarray, labels: np.ndarray, out_dir: str):
    """The evaluation classifier (trained here, or the cached one made from the same inputs)."""
    steps, seed = cfg.evaluate.classifier_steps, cfg.run.seed
    want = {"shards": Manifest.load(run_paths.data_dir(cfg)).extra.get("fingerprint"), "steps": steps, "seed": seed,
            "kind": domain.feature_net, "n_train": int(len(tokens))}
    path = os.path.join(out_dir, "classifier")
    if os.path.isfile(os.path.join(path, "feature_net.json")):
        net = load_feature_net(path)
        if all(net.meta.get(k) == v for k, v in want.items()):
            log.info("evaluation classifier: cached %s (trained on %d items, %d steps)", path, len(tokens), steps)
            return net, dict(net.meta)
    n_classes = domain.n_classes or int(labels.max(initial=0)) + 1
    if n_classes < 2:
        raise InputError(f"evaluate: every training item of {run_paths.data_dir(cfg)} has label {int(labels.max(initial=0))}; "
                         f"the {domain.feature_net} evaluation classifier needs >= 2 classes (label the corpus)")
    net = build_feature_net(domain.feature_net, n_classes, domain.vocab_size, tokens.shape[1], seed)
    t0 = time.perf_counter()
    info = train_feature_net(net, tokens, labels, steps=steps, seed=seed)
    info.update(want, seconds=round(time.perf_counter() - t0, 1))
    save_feature_net(net, path, info)
    log.info("evaluation classifier trained in %.0f s: accuracy %.3f on its held-out tenth of the training items",
             info["seconds"], info["heldout_acc"])
    return net, info


@torch.no_grad()
def class_stats(net, tokens: np.ndarray, labels=None) -> dict:
    dev = next(net.parameters()).device
    probs = torch.cat([torch.softmax(net(torch.from_numpy(b).to(dev)), -1).cpu()
                       for b in np.array_split(tokens, max(1, len(tokens) // 512))])
    top, pred = probs.max(-1)
    hist = torch.bincount(pred, minlength=probs.shape[1]).double() / len(pred)
    nz = hist[hist > 0]
    out = {"confidence": float(top.mean()), "confident_frac": float((top > CONFIDENT).double().mean()),
           "class_entropy": float(-(nz * nz.log()).sum())}
    if labels is not None:
        out["accuracy"] = float((pred.numpy() == labels).mean())
    return out


def factorized_tokens(train: np.ndarray, vocab: int, n: int, seed: int) -> np.ndarray:
    """``n`` rows, every position drawn independently from its training marginal (Prop. 1's barrier)."""
    T = train.shape[1]
    counts = np.stack([np.bincount(train[:, t], minlength=vocab) for t in range(T)]).astype(np.float64)
    cdf = np.cumsum(counts / counts.sum(1, keepdims=True), 1)
    u = np.random.default_rng(seed).random((n, T))
    return np.minimum((u[..., None] > cdf[None]).sum(-1), vocab - 1).astype(np.int64)


def sweep_settings(cfg):
    e = cfg.evaluate
    for ls, tp, t in itertools.product(e.latent_scales, e.top_ps, e.temperatures):
        yield dict(steps=1, latent_scale=float(ls), top_p=float(tp), temperature=float(t))


def sweep_series(cfg, domain, out_dir: str):
    """(name, kind, settings, tokens in the classifier's order, seconds) for every sweep point."""
    from ...components import dist as D

    for kind in ["generator"] + (["stage_a"] if cfg.evaluate.stage_a_series else []):
        path = run_paths.sampling_export(cfg, kind)
        what = "Stage A" if kind == "stage_a" else "generator"
        if not os.path.isfile(os.path.join(path, "config.json")):
            log.warning("no %s export at %s: its sweep is skipped", what, path)
            continue
        check_export(path, f"{what} export", f"re-run {'stage_a' if kind == 'stage_a' else 'stage_b'} to re-export it, "
                     f"or set evaluate.sweep=false")
        dev = D.device()
        model, meta = G.load_export(path, dev, kind)
        codec = domain.sample_codec(meta)
        for over in sweep_settings(cfg):
            settings = G.settings_from_cfg(cfg, **over)
            name = f"s{over['latent_scale']:g}_p{over['top_p']:g}_t{over['temperature']:g}"
            name = f"stage_a_{name}" if kind == "stage_a" else f"onestep_{name}"
            t0 = time.perf_counter()
            idx = range(cfg.evaluate.num_samples)
            ids = sample_any(model, meta, idx, settings, batch_size=cfg.sample.batch_size, device=dev,
                             vocab_limit=len(codec))
            dt = time.perf_counter() - t0
            write_jsonl(os.path.join(out_dir, "samples", f"{name}.jsonl"), codec.to_records(ids, idx, settings))
            yield name, "sweep" if kind == "generator" else "stage_a", over, domain.feature_tokens(ids.numpy()), dt


def evaluate(cfg, domain) -> dict:
    e = cfg.evaluate
    out_dir = run_paths.stage_dir(cfg, "evaluate")
    if not os.path.isfile(os.path.join(run_paths.data_dir(cfg), "manifest.json")):
        raise InputError(f"evaluate: no shard set at {run_paths.data_dir(cfg)} (the classifier and the reference are "
                         f"made from it); run preprocess first")
    train, train_labels = read_split(cfg, domain, "train")
    held, held_labels = read_split(cfg, domain, "heldout")
    if len(train) < 2:
        raise InputError(f"evaluate: the shard set at {run_paths.data_dir(cfg)} has {len(train)} training items")
    net, cls_info = classifier(cfg, domain, train, train_labels, out_dir)
    ref = train[:e.reference_samples]
    series = []  # (name, kind, settings, tokens, seconds)
    samples = run_paths.samples_file(cfg)
    if os.path.isfile(samples):
        series.append((f"file:{os.path.basename(samples)}", "file", {}, domain.sample_file_tokens(samples), None))
    if e.sweep:
        series += list(sweep_series(cfg, domain, out_dir))
    if e.factorized_series:
        series.append(("factorized", "factorized", {}, factorized_tokens(train, domain.vocab_size, e.num_samples,
                                                                         cfg.sample.seed), None))
    if len(held) >= 2:
        series.append(("heldout", "reference", {}, held[:e.num_samples], None))
    rows = []
    ref_images = domain.inception_images(ref)  # None: not images, or no local Inception weights wanted
    for name, kind, over, toks, dt in series:
        if len(toks) < 2:
            log.warning("%s: %d samples, too few for a Fréchet distance; skipped", name, len(toks))
            continue
        row = {"name": name, "kind": kind, **over, "num_samples": int(len(toks)), "sample_seconds": dt,
               "fd_classifier": frechet_distance(net, ref, toks),
               "fid_inception": None if ref_images is None else inception_fid(ref_images, domain.inception_images(toks))}
        row.update(class_stats(net, toks, held_labels[:len(toks)] if kind == "reference" else None))
        row.update(domain.extra_metrics(toks, ref))
        domain.write_grid(toks[:64], os.path.join(out_dir, "grids", f"{name.replace(':', '_')}.png"))
        log.info("%s: FD (classifier) %.3f, confidence %.3f, class entropy %.3f", name, row["fd_classifier"],
                 row["confidence"], row["class_entropy"])
        rows.append(row)
    if not rows:
        raise InputError("evaluate scored nothing: no samples file, no export to sweep, no held-out items")
    held_acc = class_stats(net, held, held_labels)["accuracy"] if len(held) else None
    figures = domain.write_eval_figures(rows, out_dir)
    from .guidance import evaluate_guidance  # class-conditional exports: the guidance table (Figure 4)

    guided = evaluate_guidance(cfg, domain, net, {**cls_info, "accuracy_heldout_split": held_acc}, ref, out_dir)
    extra = {"metric": "classifier_frechet", "domain": domain.name, "domain_columns": list(domain.extra_columns),
             "classifier": {**cls_info, "kind": domain.feature_net, "accuracy_heldout_split": held_acc,
                            "what": "penultimate features of a small classifier trained on the training items "
                                    "(stands in for Inception, whose weights cannot be fetched here)"},
             "reference": {"split": "train", "samples": int(len(ref))},
             "config": {"evaluate": cfg.to_dict()["evaluate"], "sample": cfg.to_dict()["sample"]}}
    os.makedirs(out_dir, exist_ok=True)
    out = {"json": report.write_results(out_dir, {"rows": rows, **extra}),
           "csv": report.write_csv(out_dir, rows, COLUMNS + list(domain.extra_columns)),
           "md": os.path.join(out_dir, "results.md")}
    write_text(out["md"], table(rows, extra))
    if figures:
        out["figures"] = figures
    if guided:
        out["guidance"] = guided
    log.info("wrote %s", json.dumps(out))
    return {"rows": len(rows), **out}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float) and 0 < abs(v) < 0.01:  # k-mer JS divergences: 1e-4 .. 1e-2 bits
        return f"{v:.2e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], extra: dict) -> str:
    """The results as a Markdown table (what the README quotes)."""
    c = extra["classifier"]
    cols = ["name", "kind", "num_samples", "fd_classifier", "fid_inception", "confidence", "confident_frac",
            "class_entropy", "accuracy"] + list(extra.get("domain_columns", []))
    cols = [k for k in cols if k in ("name", "kind") or any(r.get(k) is not None for r in rows)]  # no empty columns
    lines = [f"Fréchet distance in the features of a {c['kind']} classifier trained on the training items "
             f"({c.get('steps')} steps; accuracy {_fmt(c.get('accuracy_heldout_split'))} on the held-out split), "
             f"reference: {extra['reference']['samples']} training items.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
