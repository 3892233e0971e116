"""The guidance table of a class-conditional run (the paper's §4.3 / Figure 4), part of ``evaluate``.

For a generator export with classes (meta ``num_classes`` > 0) and ``evaluate.guidance.enabled``,
every row draws ``evaluate.guidance.num_samples`` one-step samples with balanced labels (sample i
is class i % C; seed ``sample.seed``, the sample section's latent scale, temperature and top-p) and
scores them against the same training reference as the unguided table:

- ``cfg_scales``: classifier-free guidance (Algorithm 4) at each scale; s = 0 is the unconditional
  G(z, null) (row ``unconditional``), s = 1 the conditional G(z, y) (``conditional``), one
  evaluation each; any other s two;
- ``classifier_steps`` x ``classifier_step_sizes``: latent classifier guidance (Algorithm 5) with
  the reward classifier (``sample.classifier``: path, relaxation, tau), K + 1 evaluations (K
  gradient steps on z, each a forward and a backward pass, then the final decode); skipped with a
  warning when no reward classifier exists (``python -m coupling_dist.classifier``);
- ``finetune_series``: the reward fine-tuned export (``run.dir/finetune/export``, Algorithm 6),
  conditional, one evaluation; skipped when absent.

Columns (``evaluation/guidance_report.py``): the Fréchet distance in the evaluation classifier's
features, that classifier's accuracy on the requested labels (it is never the network guidance
optimises: the reward classifier is another network, ``python -m coupling_dist.classifier``), the
reward classifier's own accuracy beside it, NFE, and seconds per 1,000 samples (this machine).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...components import paths as run_paths
from ...components.atomic import write_jsonl
from ...components.logging import get_logger
from ...evaluation import guidance_report
from ...evaluation.frechet import frechet_distance
from ...sampling import generate as G
from ...sampling.p2_self import sample_any

log = get_logger("evaluate")


def _settings(cfg):
    """(name, mechanism, strength, nfe, export kind, settings overrides) of every row."""
    g = cfg.evaluate.guidance
    for s in g.cfg_scales:
        s = float(s)
        mech = {0.0: "unconditional", 1.0: "conditional"}.get(s, "cfg")
        yield f"cfg_s{s:g}", mech, s, 1 if s in (0.0, 1.0) else 2, "generator", dict(guidance="cfg", cfg_scale=s)
    from ...guidance.latent import latent_guidance_settings

    algo5 = {k: v for k, v in latent_guidance_settings(cfg).items() if k != "path"}  # relaxation, tau
    for k in g.classifier_steps:
        for eta in g.classifier_step_sizes:
            over = dict(guidance="classifier", classifier=dict(algo5, steps=int(k), step_size=float(eta)))
            yield f"classifier_K{int(k)}_eta{float(eta):g}", "classifier", float(eta), int(k) + 1, "generator", over
    if g.finetune_series:
        yield "finetune", "finetune", None, 1, "finetune", dict(guidance="none")


def _reward(cfg, domain, meta, device):
    """The reward classifier (None when there is none: its rows are skipped)."""
    from ...components.preflight import InputError
    from ...guidance.latent import latent_guidance_settings
    from ...guidance.reward import load_reward

    try:
        return load_reward(latent_guidance_settings(cfg)["path"], domain, meta, device)
    except InputError as e:
        log.warning("guidance table: no reward classifier (%s): the classifier-guidance rows and the "
                    "reward-accuracy column are skipped", e)
        return None


def evaluate_guidance(cfg, domain, net, cls_info: dict, ref: np.ndarray, out_dir: str):
    """Write the guidance table and plot (``guidance.*`` in ``out_dir``); None when the run's generator
    export is unconditional, absent, or the table is disabled."""
    from ...components import dist as D
    from ...stages.evaluate.classifier_frechet import class_stats

    g = cfg.evaluate.guidance
    path = run_paths.sampling_export(cfg, "generator")
    if not g.enabled or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    dev = D.device()
    model, meta = G.load_export(path, dev, "generator")
    C = int(meta.get("num_classes") or 0)
    if not C:
        return None
    n = int(g.num_samples or cfg.evaluate.num_samples)
    idx = range(n)
    labels = np.arange(n) % C
    codec = domain.sample_codec(meta)
    reward = _reward(cfg, domain, meta, dev)
    finetuned = run_paths.finetune_export(cfg)
    rows = []
    for name, mech, strength, nfe, kind, over in _settings(cfg):
        if mech == "classifier" and reward is None:
            continue
        m, mt = model, meta
        if kind == "finetune":
            if not os.path.isfile(os.path.join(finetuned, "config.json")):
                log.info("guidance table: no fine-tuned export at %s (python -m coupling_dist.finetune): row skipped",
                         finetuned)
                continue
            m, mt = G.load_export(finetuned, dev, "generator")
        settings = G.settings_from_cfg(cfg, label=-1, **over)
        t0 = time.perf_counter()
        ids = sample_any(m, mt, idx, settings, batch_size=cfg.sample.batch_size, device=dev, vocab_limit=len(codec),
                         **({"reward": reward} if mech == "classifier" else {}))
        dt = time.perf_counter() - t0
        write_jsonl(os.path.join(out_dir, "samples", f"guidance_{name}.jsonl"), codec.to_records(ids, idx, settings))
        toks = domain.feature_tokens(ids.numpy())
        row = {"name": name, "mechanism": mech, "strength": strength, "nfe": nfe, "num_samples": n,
               "fd_classifier": frechet_distance(net, ref, toks),
               "accuracy": class_stats(net, toks, labels)["accuracy"], "sec_per_1k": 1000.0 * dt / n,
               "reward_accuracy": None if reward is None else class_stats(reward.net, toks, labels)["accuracy"]}
        domain.write_grid(toks[:8 * C], os.path.join(out_dir, "grids", f"guidance_{name}.png"), C)  # a column per class
        log.info("guidance %s: FD %.1f, accuracy %.3f, NFE %d, %.2f s / 1k samples", name, row["fd_classifier"],
                 row["accuracy"], nfe, row["sec_per_1k"])
        rows.append(row)
    if not rows:
        return None
    extra = {"settings": {"latent_scale": cfg.sample.latent_scale, "temperature": cfg.sample.temperature,
                          "top_p": cfg.sample.top_p, "seed": cfg.sample.seed, "labels": "balanced (i % C)",
                          "num_classes": C, "relaxation": cfg.sample.classifier.relaxation,
                          "tau": cfg.sample.classifier.tau}}
    return guidance_report.write_all(out_dir, rows, {**cls_info, "kind": domain.feature_net}, extra)
