"""Checkpoint selection, RNG round trips and EMA shards (no DeepSpeed engine needed here; the
engine-level save/resume paths run in tests/test_trainer.py with real ranks)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from coupling_dist.components.atomic import write_text as write_text_atomic
from coupling_dist.components.checkpoint import (MARKER, CheckpointError, CheckpointManager, complete_checkpoints,
                                                 find_resume, rng_state, set_rng_state, step_name)
from coupling_dist.components.ema import EMA


def make_ckpt(root, step: int, complete: bool = True, suffix: str = "") -> str:
    path = os.path.join(root, step_name(step) + suffix)
    os.makedirs(path)
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"x")
    if complete:
        write_text_atomic(os.path.join(path, MARKER), json.dumps({"step": step}))
    return path


def test_resume_never_picks_interrupted_writes(tmp_path):
    root = str(tmp_path)
    assert find_resume(root, "auto") is None
    good = make_ckpt(root, 100)
    make_ckpt(root, 200, complete=False)  # crashed before its marker
    make_ckpt(root, 300, suffix=".tmp")  # crashed mid-write (even with a marker inside)
    assert find_resume(root, "auto") == good
    write_text_atomic(os.path.join(root, "latest"), "step_00000200\n")  # pointer to a broken one
    assert find_resume(root, "auto") == good
    write_text_atomic(os.path.join(root, "latest"), "step_00000300.tmp\n")
    assert find_resume(root, "auto") == good
    newer = make_ckpt(root, 150)
    write_text_atomic(os.path.join(root, "latest"), "step_00000100\n")
    assert find_resume(root, "auto") == good  # latest wins when it is complete
    os.remove(os.path.join(root, "latest"))
    assert find_resume(root, "auto") == newer
    assert find_resume(root, "none") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*train.resume=none"):
        find_resume(root, os.path.join(root, "step_00000200"))
    assert find_resume(root, good) == good
    # a marker whose step disagrees with the directory name is not trusted
    bad = make_ckpt(root, 400)
    write_text_atomic(os.path.join(bad, MARKER), json.dumps({"step": 7}))
    assert [s for s, _ in complete_checkpoints(root)] == [100, 150]


def test_prune_keeps_last_k_and_stale_tmp(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for s in (10, 20, 30):
        make_ckpt(mgr.root, s)
    make_ckpt(mgr.root, 15, suffix=".tmp")
    make_ckpt(mgr.root, 40, suffix=".tmp")  # newer than every complete one: may be in progress
    mgr.prune()
    assert sorted(os.listdir(mgr.root)) == ["step_00000020", "step_00000030", "step_00000040.tmp"]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.randn(5), np.random.rand(3), random.random()
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    want = (random.random(), np.random.rand(4), torch.randn(6))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), np.random.rand(4), torch.randn(6))
    assert got[0] == want[0] and np.array_equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_ema_shards_reload_at_another_dp_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    # three "ranks" of a DP-3 run, each owning a third of the parameters
    emas = [EMA(model, 0.5, r, 3) for r in range(3)]
    assert sorted(n for e in emas for n in e.owned) == sorted(n for n, _ in model.named_parameters())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for e in emas:
        e.update()
    shards = [e.state_dict() for e in emas]
    two = [EMA(model, 0.5, r, 2) for r in range(2)]
    for e in two:
        e.load_shards(shards)
    merged = {n: t for e in two for n, t in e.shadow.items() if n in e.owned}
    for n, p in model.named_parameters():
        assert torch.allclose(merged[n], start[n] + 0.5), n  # 0.5 * start + 0.5 * (start + 1)


# --------------------------------------------------------------------------- broken checkpoints, full disk
# Real checkpoints from the real Trainer (the toy task of trainer_worker.py, one process: seconds).

import shutil  # noqa: E402
import subprocess  # noqa: E402

from conftest import PY, ROOT  # noqa: E402

from coupling_dist.components import faults  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "trainer_worker.py")


def _worker(out_dir, *args, env=None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=ROOT)
    full.pop(faults.ENV, None)
    full.update(env or {})
    return subprocess.run([PY, WORKER, "--dir", str(out_dir), "--ckpt", "4", *map(str, args)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """step_00000004 and step_00000008 (latest), each with its per-file record."""
    out = tmp_path_factory.mktemp("ckpts")
    proc = _worker(out, "--steps", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(src, dst):
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst / "checkpoints"


def test_completion_record_holds_every_files_size_and_crc(two_checkpoints):
    ck = two_checkpoints / "checkpoints" / "step_00000008"
    files = json.loads((ck / MARKER).read_text())["files"]
    on_disk = sorted(os.path.relpath(os.path.join(d, f), ck) for d, _, fs in os.walk(ck) for f in fs if f != MARKER)
    assert sorted(files) == on_disk and "trainer_state_rank0.pt" in files and "mp_rank_00_model_states.pt" in files
    for name, rec in files.items():
        data = (ck / name).read_bytes()
        assert rec["bytes"] == len(data) and int(rec["crc32"], 16) == __import__("zlib").crc32(data)


@pytest.mark.parametrize("damage", ["truncated_model", "missing_rank_file", "flipped_byte", "binary_latest"])
def test_broken_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, two_checkpoints, damage):
    ck = _copy(two_checkpoints, tmp_path)
    bad = ck / "step_00000008"
    if damage == "truncated_model":
        f = bad / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        named = f"{f} is "
    elif damage == "missing_rank_file":
        f = bad / "trainer_state_rank0.pt"
        f.unlink()
        named = f"{f} is missing"
    elif damage == "flipped_byte":
        f = bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        named = f"{f} has another CRC32"
    else:  # latest is not text: the newest complete checkpoint (step 8, intact) is used
        (ck / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
        named = None
    proc = _worker(tmp_path, "--steps", 12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "log.rank0.txt").read_text()
    if named is None:
        assert f"{ck / 'latest'} is not a readable text file" in log
        assert f"resumed from {bad} at step 8" in log
        return
    assert f"checkpoint {bad} is broken: {named}" in log, log[-3000:]
    assert f"falling back to {ck / 'step_00000004'}" in log
    assert f"resumed from {ck / 'step_00000004'} at step 4" in log
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(5, 13))  # trained on from step 4, not from 8 and not from scratch
    assert (ck / "latest").read_text().strip() == "step_00000012"


def test_no_intact_checkpoint_fails_naming_the_path_and_the_key(tmp_path, two_checkpoints):
    ck = _copy(two_checkpoints, tmp_path)
    for step in ("step_00000004", "step_00000008"):
        f = ck / step / "trainer_state_rank0.pt"
        f.write_bytes(f.read_bytes()[:100])
    proc = _worker(tmp_path, "--steps", 12)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint {ck / 'step_00000008'} is broken: {ck / 'step_00000008' / 'trainer_state_rank0.pt'} is 100 bytes" in err[0]
    assert "train.resume=none" in err[0]
    # train.resume pointing nowhere: the same clean failure, naming the path and the alternatives
    proc = _worker(tmp_path, "--steps", 12, "--resume", tmp_path / "nowhere")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"train.resume: '{tmp_path / 'nowhere'}' is not a complete checkpoint" in proc.stderr
    assert "train.resume=none" in proc.stderr


def test_full_disk_during_a_checkpoint(tmp_path):
    """ENOSPC while writing step 8 (after DeepSpeed's files, at our trainer state): the error says
    "no space left on device" with the path, step_00000008.tmp is removed, latest stays on step 4,
    and the same command later resumes from step 4."""
    spec = faults.spec("checkpoint.write", step=8, error="enospc")
    proc = _worker(tmp_path, "--steps", 12, env={faults.ENV: spec})
    ck = tmp_path / "checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"no space left on device writing checkpoint {ck / 'step_00000008.tmp' / 'trainer_state_rank0.pt'}"
            in err[0]), err
    assert f"removed {ck / 'step_00000008.tmp'}" in err[0] and "latest still names" in err[0]
    assert not (ck / "step_00000008.tmp").exists() and not (ck / "step_00000008").exists()
    assert (ck / "latest").read_text().strip() == "step_00000004"
    proc = _worker(tmp_path, "--steps", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000004'} at step 4" in (tmp_path / "log.rank0.txt").read_text()


def test_full_disk_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    from conftest import torchrun

    spec = faults.spec("checkpoint.write", step=8, rank=1, error="enospc")
    proc = torchrun(2, [WORKER, "--dir", str(tmp_path), "--ckpt", "4", "--steps", "12"], env={faults.ENV: spec},
                    timeout=600, check=False)
    ck = tmp_path / "checkpoints"
    assert proc.returncode != 0
    errs = [line for line in proc.stderr.splitlines() if "error: no space left on device" in line]
    want = f"no space left on device writing checkpoint {ck / 'step_00000008.tmp' / 'trainer_state_rank1.pt'} (rank 1)"
    # every rank that reports (torchrun stops the rest once one has exited) names rank 1's failure
    assert errs and all(want in e for e in errs), proc.stderr[-4000:]
    assert not (ck / "step_00000008.tmp").exists() and (ck / "latest").read_text().strip() == "step_00000004"


def test_full_disk_inside_deepspeeds_own_save_on_one_rank(tmp_path):
    """ENOSPC in DeepSpeed's optimizer-shard write on rank 1 only: rank 0 finishes DeepSpeed's save
    (which ends in a barrier); both ranks still end promptly with the message. Without the meeting
    at that barrier both ranks would wait for the collective timeout (set far beyond this test's
    limit: the run would time out here)."""
    from conftest import torchrun

    proc = torchrun(2, [WORKER, "--dir", str(tmp_path), "--ckpt", "4", "--steps", "12", "--ds-enospc", "8:1"],
                    env={"COUPLING_DIST_TIMEOUT_S": "3600"}, timeout=600, check=False)
    ck = tmp_path / "checkpoints"
    assert proc.returncode != 0, proc.stderr[-4000:]
    errs = [line for line in proc.stderr.splitlines() if "error: no space left on device" in line]
    assert errs and all(f"writing checkpoint {ck / 'step_00000008.tmp'}" in e and "(rank 1)" in e for e in errs), \
        proc.stderr[-4000:]
    assert not (ck / "step_00000008.tmp").exists() and (ck / "latest").read_text().strip() == "step_00000004"
