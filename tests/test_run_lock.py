"""Concurrency (issue 14.7): one pipeline and one run of each stage per run.dir at a time, a lock
left by a dead process is taken over, and a pipeline that is stopped or killed does not leave its
running stage behind as an orphan.

The running stage is a real ``sample`` stage drawing from a tiny Stage A export (real Qwen2.5
tokenizer) far more samples than it will ever finish, so it is busy for as long as the test needs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

from conftest import DEMO, PY, ROOT, run_module
from coupling_dist.components import run_lock

BUSY = ["pipeline.stages=[sample]", "sample.kind=stage_a", "sample.num_samples=10000000", "sample.batch_size=4",
        "run.wandb.mode=disabled", "run.progress=false"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import torch

    from coupling_dist.components import assets
    from coupling_dist.config import DecoderConfig, FlowConfig, StageAConfig
    from coupling_dist.models.stage_a import StageAModel
    from coupling_dist.models.stage_a_export import export_stage_a

    torch.manual_seed(0)
    cfg = StageAConfig(latent_dim=4, flow=FlowConfig(layers=2, hidden=16, heads=2),
                       decoder=DecoderConfig(width=16, depth=1, heads=2, ffn=32))
    model = StageAModel(8, 151936, cfg).eval()
    tok = assets.tokenizer_identity("asset:qwen2.5-tokenizer")
    return export_stage_a(model, str(tmp_path_factory.mktemp("lock") / "export"), {"seq_len": 6, "tokenizer": tok})


def _start_pipeline(run_dir, export, log_path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([PY, "-m", "coupling_dist.pipeline", "--config", DEMO, f"run.dir={run_dir}", *BUSY,
                             f"sample.export={export}"], cwd=ROOT, env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def _stage_pid(run_dir, pipeline: subprocess.Popen, log_path, timeout: float = 600) -> int:
    """The pid of the stage process, once it holds its lock and has started (its inputs recorded)."""
    lock = run_lock.lock_path(str(run_dir), "sample")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert pipeline.poll() is None, open(log_path).read()[-3000:]
        text = open(lock).read() if os.path.exists(lock) else ""
        if text and os.path.exists(os.path.join(run_dir, "sample", "_INPUTS.json")):
            pid = int(text.split(" pid ")[1].split()[0])
            assert pid != pipeline.pid and pid in [c.pid for c in psutil.Process(pipeline.pid).children()]
            return pid
        time.sleep(0.2)
    raise AssertionError("the sample stage did not start: " + open(log_path).read()[-3000:])


def _gone(pid: int, timeout: float = 120) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_second_pipeline_or_stage_on_a_busy_run_dir_refuses(tmp_path, export):
    log = tmp_path / "first.log"
    first = _start_pipeline(tmp_path / "run", export, log)
    try:
        stage = _stage_pid(tmp_path / "run", first, log)
        host = socket.gethostname()
        second = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path / 'run'}", *BUSY,
                            f"sample.export={export}", check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is held by host {host} pid {first.pid} (the pipeline of run.dir" in second.stderr
        alone = run_module("coupling_dist.sample", "--config", DEMO, f"run.dir={tmp_path / 'run'}", *BUSY,
                           f"sample.export={export}", check=False)
        assert alone.returncode == 2, alone.stderr[-3000:]
        assert f"stage sample of run.dir {tmp_path / 'run'} is in use" in alone.stderr
        assert f"held by host {host} pid {stage} " in alone.stderr
        assert first.poll() is None and psutil.pid_exists(stage)  # the refusals left the running ones alone
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=180)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_or_killing_the_pipeline_ends_its_stage(tmp_path, export, sig):
    log = tmp_path / "pipeline.log"
    pipeline = _start_pipeline(tmp_path / "run", export, log)
    try:
        stage = _stage_pid(tmp_path / "run", pipeline, log)
        os.kill(pipeline.pid, sig)
        rc = pipeline.wait(timeout=180)
        assert _gone(stage), f"the stage (pid {stage}) outlived the pipeline"
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    out = log.read_text()
    if sig == signal.SIGKILL:  # nothing to forward: the kernel's parent-death signal ended the stage
        assert rc == -signal.SIGKILL
        # the next pipeline takes over the dead one's lock (and the stage's), saying whose it was
        again = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path / 'run'}", *BUSY,
                           f"sample.export={export}", "sample.num_samples=4", check=False)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"taking over {run_lock.lock_path(str(tmp_path / 'run'), 'pipeline')}" in again.stderr
        assert f"pid {pipeline.pid} (the pipeline of run.dir" in again.stderr
    else:  # forwarded: the pipeline waited for the stage, then reported and stopped
        assert rc == 128 + sig, out[-3000:]
        assert f"sample: stopped by signal {int(sig)}" in out and "FAILED" in out
        assert not os.path.exists(tmp_path / "run" / "sample" / "_COMPLETE.json")


def test_lock_of_a_dead_holder_is_taken_over(tmp_path):
    path = run_lock.lock_path(str(tmp_path), "stage_b")
    holder = subprocess.Popen([PY, "-c", "import sys, time; from coupling_dist.components.run_lock import RunLock; "
                               "RunLock(sys.argv[1], 'test').acquire(); print('held', flush=True); time.sleep(600)",
                               path], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunLockError, match=f"held by host .* pid {holder.pid} "):
            run_lock.RunLock(path, "stage_b").acquire()
    finally:
        holder.kill()
        holder.wait()
    with run_lock.RunLock(path, "stage_b") as lock:  # the dead holder's flock is gone
        assert f"pid {os.getpid()} " in open(path).read() and lock.fd is not None
    assert open(path).read() == ""  # released cleanly: nobody named
