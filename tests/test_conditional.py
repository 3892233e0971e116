"""Class-conditional models and classifier-free guidance (issue 17, Algorithm 4): CFG's end points
are the conditional / unconditional logits exactly for every generator kind, label -1 is the null
class, conditioning dropout is a function of (seed, step, rank), exports keep num_classes, an
unconditional model refuses labels, the pair store carries labels, sampled records carry labels
and do not depend on the batch size; and a small conditional run through the real stages (slow)."""
from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch

from conftest import ROOT, run_module
from coupling_dist.config import ConfigError, GeneratorConfig, StageAConfig, load_config
from coupling_dist.guidance.cfg import cfg_logits
from coupling_dist.models.composite_generator import CompositeGenerator, composite_arch
from coupling_dist.models.generator import Generator, export_generator, load_generator
from coupling_dist.models.stage_a import PriorDecoder, StageAModel
from coupling_dist.models.stage_a_export import export_stage_a, load_stage_a
from coupling_dist.sampling.generate import generate_records
from coupling_dist.sampling.onestep import SampleSettings
from coupling_dist.sampling.p2_self import sample_any

T, D, V, C = 6, 4, 16, 3
GUIDANCE_DEMO = os.path.join(ROOT, "configs", "mnist_guidance_demo.yaml")


def small_stage_a(num_classes: int = C) -> StageAModel:
    cfg = StageAConfig(latent_dim=D, flow=dataclasses.replace(StageAConfig().flow, layers=2, hidden=16, heads=2),
                       decoder=dataclasses.replace(StageAConfig().decoder, width=16, depth=1, heads=2, ffn=32))
    torch.manual_seed(0)
    model = StageAModel(0, 2, cfg, num_classes)
    with torch.no_grad():  # the zero-initialised conditioner outputs would make every class the identity
        for p in model.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def generators(num_classes: int = C) -> dict:
    torch.manual_seed(1)
    g = GeneratorConfig(width=32, depth=1, heads=4, ffn=64)
    out = {"onestep": Generator(g, D, T, V, num_classes=num_classes),
           "masked": Generator(dataclasses.replace(g, kind="masked"), D, T, V, mask_token_id=V - 1,
                               num_classes=num_classes)}
    sa = small_stage_a(num_classes)
    comp = CompositeGenerator(composite_arch(sa.cfg), D, T, V, num_classes)
    comp.load_stage_a(sa.state_dict())
    out["composite"] = comp
    return {k: m.eval() for k, m in out.items()}


@pytest.mark.parametrize("kind", ["onestep", "masked", "composite"])
@torch.no_grad()
def test_cfg_end_points_are_the_conditional_and_unconditional_logits(kind):
    model = generators()[kind]
    z = torch.randn(4, T, D, generator=torch.Generator().manual_seed(2))
    x_t = torch.tensor([[V - 1, 1, V - 1, 0, V - 1, 2]] * 4) if kind == "masked" else None
    y = torch.tensor([0, 2, -1, 1])
    cond, uncond = model(z, x_t, labels=y), model(z, x_t)
    assert torch.equal(cfg_logits(model, z, y, 1.0, x_t), cond)
    assert torch.equal(cfg_logits(model, z, y, 0.0, x_t), uncond)
    torch.testing.assert_close(cfg_logits(model, z, y, 2.5, x_t), uncond + 2.5 * (cond - uncond))
    # the class matters, and label -1 is exactly the null class (labels=None) row by row
    assert (cond[0] - uncond[0]).abs().max() > 1e-3 and (cond[0] - cond[1]).abs().max() > 1e-3
    assert torch.equal(cond[2], uncond[2])
    assert torch.equal(model(z, x_t, labels=torch.full((4,), -1)), uncond)
    # hidden() takes the labels too (what Stage B's loss reads)
    assert torch.equal(model.hidden(z, x_t, labels=y), model.hidden(z, x_t, y))


@torch.no_grad()
def test_stage_a_flow_is_conditional_invertible_and_prior_decoder_takes_labels():
    sa = small_stage_a()
    u = torch.randn(3, T, D, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, -1])
    z = sa.to_gaussian(u, labels=y)
    torch.testing.assert_close(sa.from_gaussian(z, labels=y), u, atol=1e-5, rtol=0)
    assert torch.equal(sa.to_gaussian(u)[2], z[2]) and not torch.allclose(sa.to_gaussian(u)[0], z[0])
    prior = PriorDecoder(sa)
    assert prior.num_classes == C and torch.equal(prior(z, labels=y), sa.decode(sa.from_gaussian(z, labels=y)))
    # the loss takes labels (-1 = dropped to the null class) and trains the class embeddings
    tok = torch.randint(0, 2, (3, T))
    with torch.enable_grad():
        loss, _ = sa.train().loss(tok, tok, torch.ones_like(tok), labels=y)
        loss.backward()
    assert sa.flow.layers[0].cond.cls.table.weight.grad.abs().sum() > 0


def test_unconditional_models_refuse_labels_clearly():
    y = torch.tensor([0, 1])
    z = torch.randn(2, T, D)
    for model in [*generators(0).values(), PriorDecoder(small_stage_a(0))]:
        assert getattr(model, "num_classes") == 0
        with pytest.raises(ValueError, match="data.num_classes"):
            model(z, None, labels=y)
        with pytest.raises(ValueError, match="unconditional"):
            cfg_logits(model, z, y, 2.0)
    # a conditional model refuses a class beyond num_classes
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        generators()["onestep"](z, labels=torch.tensor([0, 3]))
    # the sampler refuses guidance or a label for an unconditional export, and a label beyond the classes
    meta = {"seq_len": T, "latent_dim": D, "vocab_size": V, "kind": "onestep", "num_classes": 0}
    with pytest.raises(ConfigError, match="unconditional"):
        sample_any(generators(0)["onestep"], meta, [0], SampleSettings(guidance="cfg", cfg_scale=2.0))
    with pytest.raises(ConfigError, match="sample.label = 5"):
        sample_any(generators()["onestep"], dict(meta, num_classes=C), [0], SampleSettings(label=5))
    with pytest.raises(ConfigError, match="the settings of Algorithm 5"):
        sample_any(generators()["onestep"], dict(meta, num_classes=C), [0], SampleSettings(guidance="classifier"))
    # and the config refuses them before any work
    with pytest.raises(ConfigError, match="sample.guidance"):
        load_config(None, ["sample.guidance=cfg"])
    with pytest.raises(ConfigError, match="TarFlow is unconditional"):
        load_config(None, ["data.num_classes=3", "stage_a.flow.kind=tarflow"])
    with pytest.raises(ConfigError, match="sample.label"):
        load_config(None, ["data.num_classes=3", "sample.label=3"])


def test_cond_dropout_is_a_function_of_seed_step_and_rank():
    from coupling_dist.stages.stage_b.task import StageBTask

    cfg = load_config(None, ["data.num_classes=10", "stage_b.cond_dropout=0.3"])
    info = {"num_classes": 10, "vocab": None}

    def task(rank, seed=0):
        c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
        return StageBTask(c, info, types.SimpleNamespace(dp_rank=rank, mpu=None))

    batch = {"label": torch.arange(4000, dtype=torch.int16).remainder(10).reshape(-1, 1)}
    a = task(0).labels(batch, 5, True)
    assert torch.equal(a, task(0).labels(batch, 5, True))  # a resumed run replays it
    for other in (task(0).labels(batch, 6, True), task(1).labels(batch, 5, True), task(0, seed=1).labels(batch, 5, True)):
        assert not torch.equal(a, other)
    dropped = a == -1
    assert 0.25 < float(dropped.float().mean()) < 0.35
    assert torch.equal(a[~dropped], batch["label"].reshape(-1).long()[~dropped])
    assert torch.equal(task(0).labels(batch, 5, False), batch["label"].reshape(-1).long())  # eval keeps every class
    # an unconditional run reads no label field and draws nothing
    plain = StageBTask(load_config(None), {"num_classes": 0, "vocab": None, "teacher": None},
                       types.SimpleNamespace(dp_rank=0, mpu=None))
    assert plain.labels(batch, 5, True) is None and "label" not in plain.fields()


def test_exports_round_trip_num_classes(tmp_path):
    gens = generators()
    z = torch.randn(2, T, D)
    y = torch.tensor([2, -1])
    meta = {"latent_dim": D, "seq_len": T, "vocab_size": V, "eos_id": None, "num_classes": C, "cond_dropout": 0.1}
    for kind in ("onestep", "composite"):
        arch = gens[kind].arch if kind == "composite" else GeneratorConfig(width=32, depth=1, heads=4, ffn=64)
        export_generator(gens[kind], arch, meta, str(tmp_path / kind))
        back, bmeta = load_generator(str(tmp_path / kind))
        assert bmeta["num_classes"] == C and bmeta["cond_dropout"] == 0.1 and back.num_classes == C
        assert torch.equal(back(z, labels=y), gens[kind](z, labels=y))
    # an export from before class conditioning (no num_classes in its meta) loads unconditional
    export_generator(generators(0)["onestep"], GeneratorConfig(width=32, depth=1, heads=4, ffn=64),
                     dict(meta, num_classes=0), str(tmp_path / "old"))
    conf_path = tmp_path / "old" / "config.json"
    conf = json.loads(conf_path.read_text())
    del conf["meta"]["num_classes"]
    conf_path.write_text(json.dumps(conf))
    old, ometa = load_generator(str(tmp_path / "old"))
    assert ometa["num_classes"] == 0 and old.num_classes == 0
    # the Stage A export records num_classes and rebuilds the conditional flow
    sa = small_stage_a()
    export_stage_a(sa, str(tmp_path / "sa"), {"seq_len": T})
    back_sa, sa_meta = load_stage_a(str(tmp_path / "sa"))
    assert sa_meta["num_classes"] == C and back_sa.num_classes == C
    u = torch.randn(2, T, D)
    assert torch.equal(back_sa.to_gaussian(u, labels=y), sa.to_gaussian(u, labels=y))


@torch.no_grad()
def test_pair_store_encodes_with_the_true_label_and_keeps_it():
    from coupling_dist.stages.pair_store.writer import encode_samples, sample_noise

    sa = small_stage_a()
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:04d}", "tokens": rng.integers(0, 2, T).astype(np.int32),
                "mask": np.ones(T, np.uint8), "label": np.array([i % C], np.int16)} for i in range(5)]
    pairs = encode_samples(sa, samples, seed=0, K=1, dtype="float32", batch_size=2)
    assert [int(p["label"][0]) for p in pairs] == [i % C for i in range(5)] and pairs[0]["label"].dtype == np.int16
    tok = torch.from_numpy(np.stack([s["tokens"] for s in samples])).long()
    eps = torch.stack([sample_noise(0, s["__key__"], 1, T, D)[0] for s in samples])
    u = sa.encode_latent(tok, None, eps)
    z = torch.from_numpy(np.stack([p["z"][0] for p in pairs]))
    torch.testing.assert_close(z, sa.to_gaussian(u, labels=torch.tensor([i % C for i in range(5)])))
    assert not torch.allclose(z, sa.to_gaussian(u))
    # an unconditional Stage A writes no label field
    assert "label" not in encode_samples(small_stage_a(0), samples[:1], seed=0, K=1, dtype="float32", batch_size=2)[0]


class _Codec:
    """A sample codec whose records are the ids (what a domain's codec returns)."""

    def __len__(self):
        return V - 1

    def to_records(self, ids, indices, settings):
        return [{"index": int(i), "ids": row, "settings": settings.to_dict()} for i, row in zip(indices, ids.tolist())]


@pytest.mark.parametrize("kind", ["onestep", "masked", "composite"])
def test_sampled_records_carry_labels_and_do_not_depend_on_the_batch_size(kind):
    model = generators()[kind]
    meta = {"seq_len": T, "latent_dim": D, "vocab_size": V, "kind": kind, "num_classes": C, "eos_id": None,
            "mask_token_id": V - 1 if kind == "masked" else None}
    steps = 3 if kind == "masked" else 1
    s = SampleSettings(temperature=1.0, top_p=0.9, latent_scale=1.0, seed=4, guidance="cfg", cfg_scale=3.0, steps=steps)
    recs = generate_records(model, meta, _Codec(), range(7), s, batch_size=3)
    assert [r["label"] for r in recs] == [i % C for i in range(7)]  # balanced: index % num_classes
    assert recs[0]["settings"]["guidance"] == "cfg" and recs[0]["settings"]["cfg_scale"] == 3.0
    again = generate_records(model, meta, _Codec(), range(7), s, batch_size=7)
    assert [r["ids"] for r in recs] == [r["ids"] for r in again]
    # a fixed class: every record has it; another scale draws other samples from the same latents
    fixed = generate_records(model, meta, _Codec(), range(4), dataclasses.replace(s, label=1), batch_size=4)
    assert [r["label"] for r in fixed] == [1] * 4
    assert recs[1]["ids"] == fixed[1]["ids"]  # sample 1 is class 1 either way: the same draw
    plain = generate_records(model, meta, _Codec(), range(7), dataclasses.replace(s, guidance="none"), batch_size=7)
    assert any(a["ids"] != b["ids"] for a, b in zip(plain, recs))
    # records of an unconditional export carry no label and unguided settings as before
    meta0 = dict(meta, num_classes=0)
    rec0 = generate_records(generators(0)[kind], meta0, _Codec(), range(2),
                            dataclasses.replace(s, guidance="none", cfg_scale=1.0), batch_size=2)[0]
    assert "label" not in rec0 and "guidance" not in rec0["settings"]


@pytest.mark.slow  # eight stage processes (about 2 min on 2 idle cores)
def test_conditional_mnist_run_through_the_real_stages(tmp_path):
    """The guidance demo's pipeline (preprocess -> stage_a -> pair_store -> stage_b -> classifier ->
    finetune -> sample -> evaluate) on 300 real digits with a few steps per stage: the Stage A export
    and the generator export record 10 classes, the pair store carries every label, the samples of
    sample.label=7 with CFG carry label 7, the guidance table has its rows."""
    run = tmp_path / "run"
    small = ["stage_a.flow.layers=2", "stage_a.flow.hidden=32", "stage_a.decoder.width=64", "stage_a.decoder.depth=1",
             "stage_a.decoder.ffn=128"]
    proc = run_module("coupling_dist.pipeline", "--config", GUIDANCE_DEMO, f"run.dir={run}", "data.max_samples=300",
                      "stage_a.train.steps=6", "stage_a.train.warmup_steps=1", "stage_b.train.steps=4",
                      "sample.num_samples=8", "sample.label=7", "run.progress=false", *small,
                      # the guidance stages of the demo's pipeline, tiny: reward classifier, fine-tuning, the table
                      "classifier.steps=20", "finetune.train.steps=3", "evaluate.classifier_steps=20",
                      "evaluate.num_samples=20", "evaluate.reference_samples=100", "evaluate.guidance.cfg_scales=[0,2]",
                      "evaluate.guidance.classifier_step_sizes=[3.0]", "evaluate.guidance.classifier_steps=[2]",
                      timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run / "stage_a/export/config.json").read_text())["num_classes"] == 10
    gen_meta = json.loads((run / "stage_b/export/config.json").read_text())["meta"]
    assert gen_meta["num_classes"] == 10 and gen_meta["cond_dropout"] == 0.1
    from coupling_dist.data.shards import Manifest, iter_shards

    assert Manifest.load(str(run / "pair_store")).fields["label"] == {"dtype": "int16", "shape": [1]}
    src = {s["__key__"]: int(s["label"][0]) for b in iter_shards(str(run / "data"), fields=["label"]) for s in b}
    pairs = {s["__key__"]: int(s["label"][0]) for b in iter_shards(str(run / "pair_store"), fields=["label"]) for s in b}
    assert pairs == src and len(set(pairs.values())) == 10
    recs = [json.loads(line) for line in (run / "sample/samples.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {r["label"] for r in recs} == {7} and recs[0]["settings"]["guidance"] == "cfg"
    # the pipeline ran the reward classifier and fine-tuning, and evaluate wrote the guidance table
    assert (run / "classifier/export/feature_net.json").is_file()
    assert json.loads((run / "finetune/export/config.json").read_text())["meta"]["num_classes"] == 10
    rows = json.loads((run / "eval/guidance.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["cfg_s0", "cfg_s2", "classifier_K2_eta3", "finetune"]
