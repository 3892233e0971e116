"""Reward fine-tuning (Algorithm 6, ``python -m coupling_dist.finetune``): the (z, y) source, the
anchor penalties, the pre-flight refusals, a real run that raises the reward with a bounded anchor
distance and exports a generator that loads and samples, and a 2-rank kill-and-resume that replays
the uninterrupted run bit for bit. Inputs: a small class-conditional generator export and a reward
classifier trained on real MNIST digits (``finetune_fixtures.py``)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT, run_module, torchrun

from coupling_dist.stages.finetune.latents import LatentLoader

# --------------------------------------------------------------------------- (z, y) source


def test_latent_batches_are_a_function_of_seed_and_step_sliced_by_rank():
    kw = dict(global_batch=6, positions=5, latent_dim=3, num_classes=4, labels="balanced", latent_scale=0.5, seed=7)
    one = LatentLoader(**kw, dp_rank=0, dp_world=1)
    halves = [LatentLoader(**kw, dp_rank=r, dp_world=2) for r in range(2)]
    it1, its = iter(one), [iter(h) for h in halves]
    for step in range(3):
        full = next(it1)
        parts = [next(i) for i in its]
        assert torch.equal(torch.cat([p["z"] for p in parts]), full["z"])  # rank slices of one global batch
        assert full["labels"].tolist() == [(step * 6 + i) % 4 for i in range(6)]  # balanced over consecutive batches
    assert 0.3 < float(full["z"].std()) < 0.7  # latent_scale 0.5
    resumed = LatentLoader(**kw, dp_rank=0, dp_world=1)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(next(iter(resumed))["z"], next(it1)["z"])  # the position is the step
    held = LatentLoader(**kw, dp_rank=0, dp_world=1, salt=1)
    assert not torch.equal(next(iter(held))["z"], LatentLoader(**kw, dp_rank=0, dp_world=1).global_batch(0)["z"])
    uni = LatentLoader(**dict(kw, labels="uniform", global_batch=4000), dp_rank=0, dp_world=1).global_batch(0)["labels"]
    counts = torch.bincount(uni, minlength=4)
    assert counts.min() > 850 and counts.max() < 1150


def test_anchor_distances():
    from coupling_dist.config import load_config
    from coupling_dist.stages.finetune.task import FinetuneTask

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    logit = FinetuneTask(load_config(None, ["finetune.anchor=logit"]), {})
    kl = FinetuneTask(load_config(None, ["finetune.anchor=kl"]), {})
    assert torch.allclose(logit.anchor_distance(a, b), ((a - b) ** 2).mean())
    p, q = torch.softmax(b, -1), torch.softmax(a, -1)  # KL(p_theta0 || p_theta), theta0's logits second
    assert torch.allclose(kl.anchor_distance(a, b), (p * (p / q).log()).sum(-1).mean())
    assert float(kl.anchor_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl.anchor_distance(a, a + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant, unlike logit MSE
    assert float(logit.anchor_distance(a, a + 3.0)) == pytest.approx(9.0)


# --------------------------------------------------------------------------- pre-flight

from finetune_fixtures import FAST, MNIST, finetune_cfg, make_generator_export, make_reward  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{export, reward, uncond, short_reward}: made once for the module."""
    base = tmp_path_factory.mktemp("ft_inputs")
    cfg = finetune_cfg(base)
    return {"export": make_generator_export(cfg, str(base / "export")),
            "uncond": make_generator_export(cfg, str(base / "uncond"), num_classes=0),
            "reward": make_reward(cfg, str(base / "reward")),
            "short_reward": make_reward(cfg, str(base / "short_reward"), length=256)}


def _run_dir(tmp_path, inputs) -> str:
    """A run.dir holding the inputs at their default places."""
    import shutil

    shutil.copytree(inputs["export"], tmp_path / "stage_b" / "export")
    shutil.copytree(inputs["reward"], tmp_path / "classifier" / "export")
    return str(tmp_path)


def test_preflight_errors(tmp_path, inputs):
    from coupling_dist.components.preflight import PreflightError
    from coupling_dist.stages.finetune.preflight import checked_task_info

    with pytest.raises(PreflightError, match=r"finetune.export: no generator export at .*stage_b/export .*coupling_dist.stage_b"):
        checked_task_info(finetune_cfg(tmp_path / "empty"), 1)
    with pytest.raises(PreflightError, match=r"finetune.export: .*uncond is an unconditional generator \(num_classes 0"):
        checked_task_info(finetune_cfg(tmp_path, f"finetune.export={inputs['uncond']}"), 1)
    with pytest.raises(PreflightError, match=r"finetune.reward: no reward classifier at .*python -m coupling_dist.classifier"):
        checked_task_info(finetune_cfg(tmp_path, f"finetune.export={inputs['export']}",
                                       f"finetune.reward={tmp_path / 'nothing'}"), 1)
    with pytest.raises(PreflightError, match=r"finetune.reward: .*reads sequences of 256 tokens, the generator makes 784"):
        checked_task_info(finetune_cfg(tmp_path, f"finetune.export={inputs['export']}",
                                       f"finetune.reward={inputs['short_reward']}"), 1)
    ok = [f"finetune.export={inputs['export']}", f"finetune.reward={inputs['reward']}"]
    with pytest.raises(PreflightError, match=r"finetune.export: .* but this config's data.domain 'dna' makes"):
        checked_task_info(finetune_cfg(tmp_path, *ok, "data.domain=dna", "stage_a.patch=1", "data.seq_len=784"), 1)
    with pytest.raises(PreflightError, match=r"finetune.tp = 2 does not divide the world size 3"):
        checked_task_info(finetune_cfg(tmp_path, *ok, "finetune.tp=2"), 3)
    with pytest.raises(PreflightError, match=r"finetune.train.batch_size \(30\) must be divisible by the data-parallel size 4"):
        checked_task_info(finetune_cfg(tmp_path, *ok, "finetune.train.batch_size=30"), 4)
    info = checked_task_info(finetune_cfg(tmp_path, *ok), 2)
    assert info["num_classes"] == 10 and info["positions"] == 49 and info["latent_dim"] == 16
    assert len(info["export_sha256"]) == 64 and len(info["reward_sha256"]) == 64


def test_cli_refuses_an_unconditional_export_with_exit_2(tmp_path, inputs):
    proc = run_module("coupling_dist.finetune", "--config", MNIST, f"run.dir={tmp_path}", *FAST,
                      f"finetune.export={inputs['uncond']}", f"finetune.reward={inputs['reward']}", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "finetune.export" in proc.stderr and "unconditional generator" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "finetune", "checkpoints"))


# --------------------------------------------------------------------------- real runs

TRAIN = ["finetune.train.batch_size=16", "finetune.train.lr=1e-2", "finetune.train.ckpt_interval=1000",
         "finetune.train.eval_interval=1000"]


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "finetune", "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if '"reward"' in line and '"eval_' not in line]


def reward_and_anchor(export: str, source: str, reward_dir: str, cfg, n: int = 200) -> dict:
    """On a fixed batch of n (z, y) (balanced labels): the mean reward on the softmax relaxation and
    on the hard argmax samples, the reward classifier's accuracy on those, and the logit MSE to theta_0."""
    import torch.nn.functional as F

    from coupling_dist.domains import build_domain
    from coupling_dist.guidance.reward import load_reward
    from coupling_dist.models.generator import load_generator

    model, meta = load_generator(export)
    theta0, _ = load_generator(source)
    reward = load_reward(reward_dir, build_domain(cfg), meta)
    g = torch.Generator().manual_seed(123)
    z = torch.randn(n, meta["seq_len"] // meta["patch"], meta["latent_dim"], generator=g)
    y = torch.arange(n) % meta["num_classes"]
    with torch.no_grad():
        logits, ref = model(z, labels=y), theta0(z, labels=y)
        anchor = float(((logits - ref) ** 2).mean())
        logits = logits[..., :2]  # the pixel rows (the others are no token)
        hard = F.one_hot(logits.argmax(-1), 2).float()
        soft_r, hard_r = reward(torch.softmax(logits, -1), y), reward(hard, y)
        acc = (F.log_softmax(reward.net(reward.classifier_input(hard)), -1).argmax(1) == y).float().mean()
    return {"reward": float(soft_r.mean()), "reward_hard": float(hard_r.mean()), "accuracy": float(acc), "anchor": anchor}


def class_reward_of_samples(export: str, reward_dir: str, cfg, n: int = 100) -> tuple[list, float]:
    """Records drawn by the sampler (``sampling.generate``, balanced labels: sample i is class i mod
    10), and the reward classifier's mean log p(label | sample) on them."""
    import numpy as np

    from coupling_dist.domains import build_domain
    from coupling_dist.guidance.reward import load_reward
    from coupling_dist.sampling.generate import generate_records, load_export
    from coupling_dist.sampling.onestep import SampleSettings

    model, meta = load_export(export)
    domain = build_domain(cfg)
    settings = SampleSettings(temperature=0.1, top_p=1.0, latent_scale=1.0, seed=5)
    recs = generate_records(model, meta, domain.sample_codec(meta), range(n), settings, batch_size=50)
    raster = torch.tensor([[int(c) for c in r["pixels"]] for r in recs])
    labels = torch.tensor([r["label"] for r in recs])
    net = load_reward(reward_dir, domain, meta).net
    with torch.no_grad():
        logp = torch.log_softmax(net(raster), -1).gather(1, labels[:, None])
    return recs, float(logp.mean())


def _finetune(run: str, steps: int, *extra: str) -> None:
    run_module("coupling_dist.finetune", "--config", MNIST, f"run.dir={run}", *FAST, *TRAIN,
               f"finetune.train.steps={steps}", *extra, timeout=600)


STEPS, LAMBDA_ANCHOR = 60, 5.0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, inputs):
    """A 60-step fine-tuning run (lambda_anchor 5) and the rewards of its export and of theta_0."""
    run = _run_dir(tmp_path_factory.mktemp("ft_tuned"), inputs)
    _finetune(run, STEPS, f"finetune.lambda_anchor={LAMBDA_ANCHOR}")
    src, out = os.path.join(run, "stage_b", "export"), os.path.join(run, "finetune", "export")
    cfg = finetune_cfg(run)
    return {"run": run, "src": src, "out": out, "cfg": cfg, "before": reward_and_anchor(src, src, inputs["reward"], cfg),
            "after": reward_and_anchor(out, src, inputs["reward"], cfg)}


def test_finetune_raises_the_reward_keeps_the_anchor_bounded_and_exports(tuned, inputs):
    from coupling_dist.models.generator import load_generator

    run, before, after = tuned["run"], tuned["before"], tuned["after"]
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 1.0, (first, last)  # the logged training reward rises
    assert all(k in rows[-1] for k in ("anchor", "reward_hard", "accuracy", "grad_norm"))
    assert before["anchor"] == 0.0
    # held-out (z, y): the reward rises, on the relaxation and on the hard samples, and so does the accuracy
    assert after["reward"] > before["reward"] + 1.0 and after["reward_hard"] > before["reward_hard"] + 0.5, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.1, (before, after)
    # the anchor keeps theta near theta_0: the objective ends no worse than at theta_0, so
    # lambda_anchor * anchor <= lambda_reward * reward gain (up to the batch's noise: 1.25)
    assert 0 < LAMBDA_ANCHOR * after["anchor"] <= 1.25 * 1.0 * (after["reward"] - before["reward"]), (before, after)
    model, meta = load_generator(tuned["out"])
    assert meta["num_classes"] == 10 and meta["train_step"] == STEPS and meta["weights"] == "live"
    ft = meta["finetune"]
    assert ft["source_export"] == os.path.abspath(tuned["src"]) and ft["lambda_anchor"] == LAMBDA_ANCHOR
    assert ft["anchor"] == "logit" and len(ft["reward_sha256"]) == 64
    assert ft["reward"] == os.path.abspath(os.path.join(run, "classifier", "export"))
    done = json.load(open(os.path.join(run, "finetune", "_COMPLETE.json")))
    assert done["summary"]["steps"] == STEPS and done["summary"]["reward"] == pytest.approx(rows[-1]["reward"])
    # the sampler draws from the fine-tuned export like from any other (labels balanced), and its
    # samples are more recognisably of their class than theta_0's
    recs, after_r = class_reward_of_samples(tuned["out"], inputs["reward"], tuned["cfg"])
    assert len(recs) == 100 and all(r["label"] == r["index"] % 10 and len(r["pixels"]) == 784 for r in recs)
    _, before_r = class_reward_of_samples(tuned["src"], inputs["reward"], tuned["cfg"])
    assert after_r > before_r + 0.5, (before_r, after_r)


@pytest.mark.slow
def test_without_the_anchor_the_generator_drifts_further(tmp_path, tuned, inputs):
    run = _run_dir(tmp_path, inputs)
    _finetune(run, STEPS, "finetune.lambda_anchor=0")
    free = reward_and_anchor(os.path.join(run, "finetune", "export"), tuned["src"], inputs["reward"], tuned["cfg"])
    assert free["reward"] > tuned["before"]["reward"] + 1.0  # it learns as well ...
    assert tuned["after"]["anchor"] < 0.5 * free["anchor"], (tuned["after"], free)  # ... but moves 2x further


# --------------------------------------------------------------------------- resume


def test_resume_refuses_another_source_export(tmp_path, tuned):
    """A checkpoint belongs to the theta_0 and reward it started from; theta_0 is not saved, so a
    resume against another export must stop (exit 2) instead of mixing two anchors."""
    run = tuned["run"]
    other = str(tmp_path / "other_export")
    make_generator_export(tuned["cfg"], other, seed=1)
    ckpt = os.path.join(run, "finetune", "checkpoints", f"step_{STEPS:08d}")
    args = ["--config", MNIST, f"run.dir={run}", *FAST, *TRAIN, f"finetune.train.steps={STEPS + 2}",
            f"finetune.export={other}"]
    # auto resume: the run's recorded inputs differ (components/provenance)
    proc = run_module("coupling_dist.finetune", *args, check=False, timeout=600)
    assert proc.returncode == 2 and "holds checkpoints of a run made from other inputs" in proc.stderr, proc.stderr[-2000:]
    # an explicit checkpoint: the task's own check against the sha256 the checkpoint records
    proc = run_module("coupling_dist.finetune", *args, f"finetune.train.resume={ckpt}", check=False, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"finetune.export: checkpoint {ckpt} was fine-tuned from {tuned['src']}" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(run, "finetune", "checkpoints", f"step_{STEPS + 2:08d}"))


@pytest.mark.slow
def test_kill_and_resume_on_two_ranks_is_bitwise(tmp_path, inputs):
    """2 gloo ranks (ZeRO-2, Gumbel relaxation: noise drawn per step and rank): SIGKILL rank 0 in
    step 5, relaunch, and the run ends bit for bit where the uninterrupted one does."""
    from coupling_dist.components import faults

    steps = 6
    args = ["-m", "coupling_dist.finetune", "--config", MNIST, *FAST, *TRAIN, f"finetune.train.steps={steps}",
            "finetune.train.ckpt_interval=3", "finetune.relaxation=gumbel", "finetune.tau=0.5",
            "finetune.train.ema_decay=0.9", "finetune.labels=uniform"]
    ref = _run_dir(tmp_path / "ref", inputs)
    torchrun(2, [*args, f"run.dir={ref}"], timeout=600)
    cut = _run_dir(tmp_path / "cut", inputs)
    proc = torchrun(2, [*args, f"run.dir={cut}"], env={faults.ENV: faults.spec("finetune.step", step=4, rank=0)},
                    check=False, timeout=600)
    assert proc.returncode != 0 and not os.path.exists(os.path.join(cut, "finetune", "export"))
    assert open(os.path.join(cut, "finetune", "checkpoints", "latest")).read().strip() == "step_00000003"
    torchrun(2, [*args, f"run.dir={cut}"], timeout=600)
    log = open(os.path.join(cut, "finetune", "log.rank0.txt"), encoding="utf-8").read()
    assert "resumed from" in log and "step_00000003 at step 3" in log
    from coupling_dist.models.generator import load_generator

    a = load_generator(os.path.join(ref, "finetune", "export"))[0].state_dict()
    b = load_generator(os.path.join(cut, "finetune", "export"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the exported EMA weights
    name = f"step_{steps:08d}"
    for f in ("mp_rank_00_model_states.pt", "ema_rank0.pt", "ema_rank1.pt"):
        x = torch.load(os.path.join(ref, "finetune", "checkpoints", name, f), weights_only=True)
        y = torch.load(os.path.join(cut, "finetune", "checkpoints", name, f), weights_only=True)
        xs, ys = x.get("module", x.get("shadow")), y.get("module", y.get("shadow"))
        assert xs.keys() == ys.keys() and all(torch.equal(xs[k], ys[k]) for k in xs), f
    ra = {r["step"]: r for r in _rows(ref)}
    rb = {r["step"]: r for r in _rows(cut)}
    for s in range(1, steps + 1):  # the logged reward / anchor of every step, the replayed ones included
        assert (ra[s]["reward"], ra[s]["anchor"]) == (rb[s]["reward"], rb[s]["anchor"]), s
