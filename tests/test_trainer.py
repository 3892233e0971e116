"""The shared Trainer with real DeepSpeed engines and real gloo ranks (toy task: tests/trainer_worker.py)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import PY, ROOT, free_port, torchrun

WORKER = os.path.join(ROOT, "tests", "trainer_worker.py")


def run_worker(nproc: int, out_dir, *args, check: bool = True):
    return torchrun(nproc, [WORKER, "--dir", str(out_dir), *map(str, args)], check=check, timeout=300)


def losses(out_dir) -> dict[int, float]:
    """step -> logged training loss (a resumed run re-logs steps after its checkpoint: last wins)."""
    out = {}
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


def final(out_dir) -> dict:
    return torch.load(os.path.join(out_dir, "final.pt"), weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-rank ZeRO-2 runs: with dropout/noise (exactness) and without (cross-layout)."""
    base = tmp_path_factory.mktemp("trainer_ref")
    run_worker(2, base / "rand", "--ema", 0.9)
    run_worker(2, base / "plain", "--ema", 0.9, "--no-random")
    return base


# ----------------------------------------------------------------------------- schedule / groups


def test_schedule_values():
    from coupling_dist.components.optim import LRLambda

    f = LRLambda(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [f(k) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    r = LRLambda(steps=1000, warmup_steps=10, restart_every=40)
    assert r(10) == pytest.approx(1.0) and r(50) == pytest.approx(1.0)  # restart: back to the peak
    assert r(30) == pytest.approx(0.5) and r(70) == pytest.approx(0.5)
    assert r(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    c = LRLambda(steps=100, warmup_steps=4, schedule="constant")
    assert [c(k) for k in (0, 3, 4, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_scheduler_through_torch_and_param_groups():
    from coupling_dist.components.optim import build_optimizer, scheduler_factory
    from coupling_dist.config import TrainConfig

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    cfg = TrainConfig(steps=20, lr=1e-3, warmup_steps=5, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == {id(model[0].weight), id(model[2].weight)}  # no decay on biases / norm gains
    sched = scheduler_factory(cfg)(opt)
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])
    restored = scheduler_factory(cfg)(build_optimizer(model, cfg))
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_lr() == pytest.approx(sched.get_last_lr())


# ----------------------------------------------------------------------------- real ranks


def test_zero2_two_ranks_trains(tmp_path):
    run_worker(2, tmp_path, "--steps", 40, "--ckpt", 20, "--lr", 3e-2)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    evals = [r["eval_mse"] for r in rows if "eval_mse" in r]
    assert len(evals) == 10 and evals[-1] < evals[0]
    for key in ("samples_per_s", "tokens_per_s", "mfu", "mfu_student", "mfu_teacher", "lr", "grad_norm"):
        assert key in train[-1] and math.isfinite(train[-1][key]), key
    assert train[-1]["tokens_per_s"] == pytest.approx(4 * train[-1]["samples_per_s"])
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000040"
    shards = sorted(p.name for p in (ck / "step_00000040").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2  # one optimizer shard per rank


@pytest.mark.parametrize("zero", [1, 3])
def test_zero1_and_zero3_match_zero2(tmp_path, reference, zero):
    run_worker(2, tmp_path, "--zero", zero, "--ema", 0.9, "--no-random")
    ref, got = final(reference / "plain"), final(tmp_path)
    assert set(got["weights"]) == set(ref["weights"])
    for k, v in ref["weights"].items():
        assert torch.allclose(got["weights"][k], v, atol=1e-5), k
        assert torch.allclose(got["ema"][k], ref["ema"][k], atol=1e-5), k
        assert not torch.equal(got["ema"][k], got["weights"][k]) or v.numel() == 1
    if zero == 3:  # model shards are really written per rank
        names = os.listdir(tmp_path / "checkpoints" / "step_00000012")
        assert sum("model_states" in n for n in names) == 2


def test_sigkill_and_resume_is_bitwise_exact(tmp_path, reference):
    proc = run_worker(2, tmp_path, "--ema", 0.9, "--kill-at", 9, check=False)
    assert proc.returncode != 0
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000008"
    # debris of interrupted writes must never be chosen
    (ck / "step_00000011.tmp").mkdir()
    (ck / "step_00000011.tmp" / "trainer_state_rank0.pt").write_bytes(b"partial")
    shutil.copytree(ck / "step_00000008", ck / "step_00000010")
    os.remove(ck / "step_00000010" / "complete.json")
    run_worker(2, tmp_path, "--ema", 0.9)
    ref, got = final(reference / "rand"), final(tmp_path)
    for k in ref["weights"]:
        assert torch.equal(got["weights"][k], ref["weights"][k]), k
        assert torch.equal(got["ema"][k], ref["ema"][k]), k
    assert losses(tmp_path) == losses(reference / "rand")
    log = open(tmp_path / "log.rank0.txt", encoding="utf-8").read()
    assert "resumed from" in log and "step_00000008 at step 8" in log


def test_resume_two_rank_checkpoint_on_one_rank(tmp_path, reference):
    shutil.copytree(reference / "plain" / "checkpoints", tmp_path / "checkpoints")
    run_worker(1, tmp_path, "--ema", 0.9, "--no-random", "--resume", tmp_path / "checkpoints" / "step_00000004")
    ref, got = losses(reference / "plain"), losses(tmp_path)
    assert sorted(got) == list(range(5, 13))  # continued at the right global step / sample
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), s
    w_ref, w_got = final(reference / "plain"), final(tmp_path)
    for k in w_ref["weights"]:
        assert torch.allclose(w_got["weights"][k], w_ref["weights"][k], atol=1e-5), k
        assert torch.allclose(w_got["ema"][k], w_ref["ema"][k], atol=1e-5), k
    marker = json.loads((tmp_path / "checkpoints" / "step_00000012" / "complete.json").read_text())
    assert marker["dp_world"] == 1 and marker["step"] == 12


def _wait_for_step(path, step: int, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"run ended early ({proc.returncode})"
        if os.path.exists(path) and any(json.loads(l).get("step", 0) >= step for l in open(path, encoding="utf-8")):
            return
        time.sleep(0.2)
    raise AssertionError("run did not reach the step in time")


def test_sigterm_single_process_checkpoints_and_exits_143(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(tmp_path / "out.txt", "w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen([PY, WORKER, "--dir", str(tmp_path), "--steps", "500", "--ckpt", "1000", "--sleep", "0.05"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 143, out[-3000:]
    step = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= step < 500 and step == max(losses(tmp_path))
    assert "stopping at step" in out


def test_sigusr1_on_one_rank_stops_both(tmp_path):
    """SLURM forwards USR1 to every task, but one late rank must not leave the others hanging."""
    import psutil

    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, "--dir", str(tmp_path), "--steps", "500", "--ckpt", "1000",
           "--sleep", "0.05"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "trainer_worker" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)
    proc.wait(timeout=120)
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode != 0 and "138" in out, out[-3000:]
    step = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= step < 500 and step == max(losses(tmp_path))
    marker = json.loads((tmp_path / "checkpoints" / f"step_{step:08d}" / "complete.json").read_text())
    assert marker["world"] == 2


def test_stage_a_entry_refuses_missing_shards(tmp_path):
    """Pre-flight: no preprocessed shard set -> exit 2 with a clear message, before any training."""
    from conftest import DEMO, run_module

    proc = run_module("coupling_dist.stage_a", "--config", DEMO, f"run.dir={tmp_path}", "run.wandb.mode=disabled",
                      check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "manifest.json not found" in proc.stderr and "preprocess" in proc.stderr
    assert not (tmp_path / "stage_a" / "checkpoints").exists()
