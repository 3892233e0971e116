"""The guidance table of ``evaluate`` (stages/evaluate/guidance.py, the paper's Figure 4): its rows
(CFG scales, latent classifier guidance, the fine-tuned export), NFE, the files it writes, that
latent classifier guidance raises the reward classifier's agreement over the unguided conditional
rows of the same seeds, and what it skips (no reward classifier; an unconditional export)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from finetune_fixtures import finetune_cfg, make_generator_export, make_reward


def _setup(tmp_path, *over):
    from coupling_dist.components import paths
    from coupling_dist.evaluation.feature_net import build_feature_net

    cfg = finetune_cfg(tmp_path / "run", "evaluate.guidance.cfg_scales=[0,1,3]", "evaluate.guidance.classifier_steps=[4]",
                       "evaluate.guidance.classifier_step_sizes=[10.0]", "evaluate.guidance.num_samples=40",
                       "sample.batch_size=20", "sample.temperature=0.1", "sample.latent_scale=1.0",
                       "sample.classifier.relaxation=softmax", *over)
    make_generator_export(cfg, paths.generator_export(cfg))
    make_generator_export(cfg, paths.finetune_export(cfg), seed=1)
    make_reward(cfg, paths.reward_classifier(cfg))
    evaluator = build_feature_net("digit2d", 10, 2, 784, seed=5, width=8)  # another network (untrained: its features)
    from coupling_dist.data.mnist import load_mnist_5k

    ref = load_mnist_5k()[0][2000:2300].astype(np.int64)  # raster order: the classifier's
    return cfg, evaluator, ref


def test_the_guidance_table_rows_files_and_reward(tmp_path):
    from coupling_dist.domains import build_domain
    from coupling_dist.stages.evaluate.guidance import evaluate_guidance

    cfg, net, ref = _setup(tmp_path)
    out_dir = str(tmp_path / "eval")
    out = evaluate_guidance(cfg, build_domain(cfg), net, {"kind": "digit2d", "accuracy_heldout_split": 0.9}, ref, out_dir)
    rows = json.load(open(out["json"]))["rows"]
    assert [(r["name"], r["mechanism"], r["nfe"]) for r in rows] == [
        ("cfg_s0", "unconditional", 1), ("cfg_s1", "conditional", 1), ("cfg_s3", "cfg", 2),
        ("classifier_K4_eta10", "classifier", 5), ("finetune", "finetune", 1)]
    for r in rows:
        assert r["num_samples"] == 40 and r["fd_classifier"] > 0 and 0 <= r["accuracy"] <= 1 and r["sec_per_1k"] > 0
    by = {r["name"]: r for r in rows}
    # Algorithm 5 moves the latents towards the requested class: the reward classifier agrees far more
    assert by["classifier_K4_eta10"]["reward_accuracy"] >= by["cfg_s1"]["reward_accuracy"] + 0.2, by
    for f in ("guidance.md", "guidance.csv", "guidance.json", "guidance_tradeoff.png", "grids/guidance_cfg_s3.png",
              "samples/guidance_classifier_K4_eta10.jsonl"):
        assert os.path.isfile(os.path.join(out_dir, f)), f
    md = open(out["md"]).read()
    assert "| classifier_K4_eta10 | classifier | 10.000 | 5 | 40 |" in md
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "samples", "guidance_cfg_s3.jsonl"))]
    assert recs[0]["settings"]["cfg_scale"] == 3.0 and len(recs) == 40


def test_the_guidance_table_skips_what_is_missing(tmp_path):
    from coupling_dist.components import paths
    from coupling_dist.domains import build_domain
    from coupling_dist.stages.evaluate.guidance import evaluate_guidance

    cfg, net, ref = _setup(tmp_path, "evaluate.guidance.cfg_scales=[2]")
    shutil.rmtree(paths.reward_classifier(cfg))
    shutil.rmtree(paths.finetune_export(cfg))
    out = evaluate_guidance(cfg, build_domain(cfg), net, {"kind": "digit2d"}, ref, str(tmp_path / "eval"))
    rows = json.load(open(out["json"]))["rows"]
    assert [r["name"] for r in rows] == ["cfg_s2"] and rows[0]["reward_accuracy"] is None
    # an unconditional export, or the table switched off: nothing
    make_generator_export(cfg, paths.generator_export(cfg) + "_u", num_classes=0)
    shutil.rmtree(paths.generator_export(cfg))
    os.replace(paths.generator_export(cfg) + "_u", paths.generator_export(cfg))
    assert evaluate_guidance(cfg, build_domain(cfg), net, {}, ref, str(tmp_path / "eval2")) is None
