"""Stage B: generator + export contract, pre-flight errors, and real training runs (single process,
TP = 2 x DP = 2 on 4 processes, kill-and-resume, ray job submit). The demo's teacher has the full
Qwen vocabulary (151,936), so a training step costs seconds on CPU: the runs use few steps."""
from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest
import torch

from conftest import PY, ROOT, demo_cfg, ray_job_submit, run_module, torchrun
from stage_b_fixtures import make_pair_store

from coupling_dist.components import faults
from coupling_dist.config import GeneratorConfig
from coupling_dist.models.generator import Generator, export_generator, load_generator

FAST = ["run.progress=false", "run.wandb.mode=disabled", "run.log_interval=1", "stage_b.train.warmup_steps=1",
        "stage_b.train.lr=3e-3", "stage_b.train.eval_interval=1000", "stage_b.kd.chunk_vocab=151936"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    make_pair_store(str(base), n_train=64, n_heldout=8)
    return str(base)


def _run_dir(tmp_path, store_dir) -> str:
    os.symlink(os.path.join(store_dir, "pair_store"), tmp_path / "pair_store")
    return str(tmp_path)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "stage_b", "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if '"loss"' in line]


# --------------------------------------------------------------------------- model + export


@pytest.mark.parametrize("kind", ["onestep", "masked"])
def test_generator_export_roundtrip(tmp_path, kind):
    cfg = GeneratorConfig(kind=kind, width=32, depth=1, heads=4, ffn=64)
    torch.manual_seed(0)
    g = Generator(cfg, 8, 10, 70, mask_token_id=69 if kind == "masked" else None)
    z = torch.randn(2, 10, 8)
    logits = g(z)
    assert logits.shape == (2, 10, 70)
    torch.testing.assert_close(g.head(g.hidden(z)), logits)
    meta = {"latent_dim": 8, "seq_len": 10, "vocab_size": 70, "eos_id": 3, "pad_id": 3, "mask_token_id": 69 if kind == "masked" else None,
            "tokenizer": {"name": "asset:qwen2.5-tokenizer"}}
    out = export_generator(g, cfg, meta, str(tmp_path / "export"))
    model, m2 = load_generator(out)
    assert m2["kind"] == kind and m2["vocab_size"] == 70 and m2["tokenizer"]["name"] == "asset:qwen2.5-tokenizer"
    torch.testing.assert_close(model(z), logits, rtol=0, atol=0)
    assert not glob.glob(str(tmp_path / ".export*"))  # no temp leftovers


def test_export_loads_without_megatron_or_deepspeed(tmp_path):
    cfg = GeneratorConfig(width=32, depth=1, heads=4, ffn=64)
    g = Generator(cfg, 8, 10, 70)
    export_generator(g, cfg, {"latent_dim": 8, "seq_len": 10, "vocab_size": 70, "eos_id": 3}, str(tmp_path / "e"))
    code = ("import sys; from coupling_dist.models.generator import load_generator; import torch\n"
            f"m, meta = load_generator({str(tmp_path / 'e')!r}); m(torch.randn(1, 10, 8))\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('megatron', 'deepspeed'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- pre-flight


def test_preflight_errors(tmp_path, store_dir):
    from coupling_dist.components.preflight import PreflightError
    from coupling_dist.stages.stage_b.preflight import checked_task_info

    empty = tmp_path / "empty"
    with pytest.raises(PreflightError, match="pair_store"):
        checked_task_info(demo_cfg(empty), 1)
    run = _run_dir(tmp_path, store_dir)
    info = checked_task_info(demo_cfg(run), 1)
    assert info["vocab_size"] == 151936 and info["latent_dim"] == 16 and info["teacher"]["hidden"] == 64
    with pytest.raises(PreflightError, match=r"latent width of field 'z' is 16 .*stage_a.latent_dim\) is 8"):
        checked_task_info(demo_cfg(run, "stage_a.latent_dim=8"), 1)
    with pytest.raises(PreflightError, match="stage_b.kd.teacher: '/nonexistent/teacher' does not exist"):
        checked_task_info(demo_cfg(run, "stage_b.kd.teacher=/nonexistent/teacher"), 1)
    with pytest.raises(PreflightError, match="tokenizer .*KD needs the same tokenizer"):
        checked_task_info(demo_cfg(run, "stage_b.kd.teacher=tiny:gpt2"), 1)
    with pytest.raises(PreflightError, match="stage_b.tp = 2 does not divide the world size 3"):
        checked_task_info(demo_cfg(run, "stage_b.tp=2"), 3)


def test_cli_refuses_mismatched_teacher_before_training(tmp_path, store_dir):
    run = _run_dir(tmp_path, store_dir)
    proc = run_module("coupling_dist.stage_b", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.dir={run}",
                      "stage_b.kd.teacher=tiny:gpt2", *FAST, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "KD needs the same tokenizer" in proc.stderr
    assert not os.path.exists(os.path.join(run, "stage_b", "checkpoints", "latest"))


# --------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_single_process_trains_and_exports(tmp_path, store_dir):
    run = _run_dir(tmp_path, store_dir)
    run_module("coupling_dist.stage_b", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.dir={run}",
               "stage_b.train.steps=8", "stage_b.train.batch_size=8", *FAST, timeout=900)
    rows = _metrics(run)
    assert rows[-1]["step"] == 8 and rows[-1]["ce"] < rows[0]["ce"] - 0.05, rows
    assert rows[-1]["kd"] > 0 and "mfu_student" in rows[-1] and "mfu_teacher" in rows[-1]
    model, meta = load_generator(os.path.join(run, "stage_b", "export"))
    assert meta["vocab_size"] == 151936 and meta["latent_dim"] == 16 and meta["weights"] == "ema"
    assert model(torch.randn(1, 32, 16)).shape == (1, 32, 151936)


@pytest.mark.slow
def test_tp2_dp2_four_processes_train(tmp_path, store_dir):
    run = _run_dir(tmp_path, store_dir)
    torchrun(4, ["-m", "coupling_dist.stage_b", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.dir={run}",
                 "stage_b.tp=2", "stage_b.train.steps=6", "stage_b.train.batch_size=8", "stage_b.train.zero_stage=1",
                 *FAST], timeout=1200)
    rows = _metrics(run)
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.05, rows
    marker = json.load(open(os.path.join(run, "stage_b", "checkpoints", "step_00000006", "complete.json")))
    assert marker["mp_world"] == 2 and marker["dp_world"] == 2
    files = os.listdir(os.path.join(run, "stage_b", "checkpoints", "step_00000006"))
    assert any("mp_rank_01" in f for f in files)  # TP shards really saved per model-parallel rank
    model, meta = load_generator(os.path.join(run, "stage_b", "export"))  # gathered to TP = 1
    assert model.head.weight.shape == (151936, 64)


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(tmp_path, store_dir):
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "stage_b.train.steps=6",
            "stage_b.train.batch_size=4", "stage_b.train.ckpt_interval=3", *FAST]
    ref = _run_dir(tmp_path / "ref", store_dir) if os.makedirs(tmp_path / "ref") is None else None
    run_module("coupling_dist.stage_b", *args, f"run.dir={ref}", timeout=900)
    os.makedirs(tmp_path / "cut")
    cut = _run_dir(tmp_path / "cut", store_dir)
    proc = run_module("coupling_dist.stage_b", *args, f"run.dir={cut}", env={faults.ENV: faults.spec("stage_b.step", step=4, rank=0)},
                      check=False, timeout=900)
    assert proc.returncode != 0 and not os.path.exists(os.path.join(cut, "stage_b", "export"))
    run_module("coupling_dist.stage_b", *args, f"run.dir={cut}", timeout=900)
    a = load_generator(os.path.join(ref, "stage_b", "export"))[0].state_dict()
    b = load_generator(os.path.join(cut, "stage_b", "export"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # EMA weights
    for name in ("ema_rank0.pt",):
        ea = torch.load(os.path.join(ref, "stage_b", "checkpoints", "step_00000006", name), weights_only=True)
        eb = torch.load(os.path.join(cut, "stage_b", "checkpoints", "step_00000006", name), weights_only=True)
        assert all(torch.equal(ea["shadow"][k], eb["shadow"][k]) for k in ea["shadow"])
    pa = torch.load(os.path.join(ref, "stage_b", "checkpoints", "step_00000006", "mp_rank_00_model_states.pt"),
                    weights_only=True)["module"]
    pb = torch.load(os.path.join(cut, "stage_b", "checkpoints", "step_00000006", "mp_rank_00_model_states.pt"),
                    weights_only=True)["module"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # live parameters


@pytest.mark.slow
def test_ray_job_submit_trains_demo(tmp_path, store_dir, ray_head):
    run = _run_dir(tmp_path, store_dir)
    proc = ray_job_submit(ray_head, ["-m", "coupling_dist.stage_b", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                                     f"run.dir={run}", "stage_b.train.steps=4", "stage_b.train.batch_size=4", *FAST])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    done = json.load(open(os.path.join(run, "stage_b", "_COMPLETE.json")))
    assert done["summary"]["launcher"] == "ray" and done["summary"]["ray_workers"] == 2
    assert done["summary"]["layout"]["world"] == 2
    assert os.path.isfile(os.path.join(run, "stage_b", "checkpoints", "step_00000004", "complete.json"))
    load_generator(os.path.join(run, "stage_b", "export"))
