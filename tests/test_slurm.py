"""Real SLURM: installs slurmctld/slurmd/munge from Debian, starts a one-machine cluster on loopback,
submits the Stage A and Stage B batch scripts with 2 tasks, and checks preemption -> checkpoint ->
requeue -> resume ends with the same parameters as an uninterrupted run. Slow: run with
``bash scripts/test.sh --slow``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO, ROOT, run_module, torchrun

pytestmark = pytest.mark.slow
CLUSTER = os.path.join(ROOT, "cluster", "slurm", "local_cluster.sh")
TRAIN = os.path.join(ROOT, "cluster", "slurm", "train.sbatch")
FAST = ["run.wandb.mode=disabled", "run.progress=false", "data.max_samples=400", "stage_a.train.eval_interval=1000"]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.fail("the SLURM test installs Debian packages and runs slurmd: it needs root")
    subprocess.run(["bash", CLUSTER, "install"], check=True, timeout=900)
    # munged refuses a socket below a directory that is not world-executable (pytest's tmp dirs are 0700)
    d = tempfile.mkdtemp(prefix="coupling_dist_slurm_")
    os.chmod(d, 0o755)
    env = dict(os.environ, LOCAL_SLURM_DIR=d, SLURM_CONF=os.path.join(d, "slurm.conf"), COUPLING_DIST_HOME=ROOT,
               PY=sys.executable, PYTHONPATH=ROOT)
    try:
        proc = subprocess.run(["bash", CLUSTER, "start"], env=env, timeout=120, capture_output=True, text=True)
        if proc.returncode != 0:
            logs = "".join(open(os.path.join(d, "log", f)).read()[-2000:] for f in sorted(os.listdir(os.path.join(d, "log"))))
            pytest.fail(f"local SLURM did not start: {proc.stderr}\n{logs}")
        yield env
    finally:
        subprocess.run(["bash", CLUSTER, "stop"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def sbatch(env, out_dir, *args) -> str:
    cmd = ["sbatch", "--parsable", "-n2", f"--output={out_dir}/slurm-%j.out", "--export=ALL", TRAIN, *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def job_field(env, jid, name) -> str:
    out = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith(f"{name}="):
            return tok.split("=", 1)[1]
    return ""


def wait_job(env, jid, timeout=900) -> str:
    # poll squeue/scontrol rather than sbatch --wait (a requeued job goes back to PENDING)
    end = time.time() + timeout
    while time.time() < end:
        state = job_field(env, jid, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", jid], env=env)
    raise AssertionError(f"job {jid} did not finish in {timeout}s (state {job_field(env, jid, 'JobState')})")


def _log(out_dir, jid) -> str:
    path = os.path.join(out_dir, f"slurm-{jid}.out")
    return open(path).read() if os.path.exists(path) else "<no log>"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Shards, a Stage A export and a pair store to train from (built locally, once)."""
    run = tmp_path_factory.mktemp("slurm_run")
    run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={run}", *FAST, "stage_a.train.steps=20",
               "pipeline.stages=[preprocess,stage_a,pair_store]", timeout=900)
    return run


def test_stage_a_and_stage_b_batch_scripts_with_two_tasks(slurm, prepared, tmp_path):
    a_dir = tmp_path / "a"
    jid = sbatch(slurm, tmp_path, "stage_a", DEMO, f"run.dir={a_dir}", f"data.out_dir={prepared}/data", *FAST,
                 "stage_a.train.steps=20")
    assert wait_job(slurm, jid) == "COMPLETED", _log(tmp_path, jid)
    assert "tasks=2" in _log(tmp_path, jid)
    assert (a_dir / "stage_a" / "export" / "model.safetensors").exists()
    assert (a_dir / "stage_a" / "_COMPLETE.json").exists()
    jid = sbatch(slurm, tmp_path, "stage_b", DEMO, f"run.dir={prepared}", *FAST, "stage_b.train.steps=10",
                 "stage_b.train.eval_interval=1000")
    assert wait_job(slurm, jid) == "COMPLETED", _log(tmp_path, jid)
    assert (prepared / "stage_b" / "export" / "model.safetensors").exists()


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted(slurm, prepared, tmp_path):
    args = [f"data.out_dir={prepared}/data", *FAST, "stage_a.train.steps=120", "stage_a.train.ckpt_interval=10"]
    ref = tmp_path / "ref"
    torchrun(2, ["-m", "coupling_dist.stage_a", "--config", DEMO, f"run.dir={ref}", *args], timeout=900)

    pre = tmp_path / "pre"
    jid = sbatch(slurm, tmp_path, "stage_a", DEMO, f"run.dir={pre}", *args)
    ckpts = pre / "stage_a" / "checkpoints"
    end = time.time() + 600
    while not (ckpts / "latest").exists():  # signal once training is under way
        assert time.time() < end and job_field(slurm, jid, "JobState") in ("PENDING", "RUNNING"), _log(tmp_path, jid)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm, check=True)
    assert wait_job(slurm, jid) == "COMPLETED", _log(tmp_path, jid)
    log = _log(tmp_path, jid)
    assert int(job_field(slurm, jid, "Restarts") or 0) >= 1, log
    assert "requeueing job" in log and "restart 1" in log

    a = load_file(str(ref / "stage_a" / "export" / "model.safetensors"))
    b = load_file(str(pre / "stage_a" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after preemption + requeue"
