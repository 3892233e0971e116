"""Fault handling: a rank that dies must not leave the others hanging, and the run resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from conftest import PY, ROOT, free_port, torchrun
from test_trainer import WORKER, losses

KILL_TIMEOUT_S = 20  # COUPLING_DIST_TIMEOUT_S for the run: the bound on any collective wait


def _step_reached(path, step: int) -> bool:
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as fh:
        return any(json.loads(line).get("step", 0) >= step for line in fh if line.strip())


def test_killed_rank_ends_the_others_with_a_message_and_the_run_resumes(tmp_path):
    """Two ranks started by hand (no torchrun to tear the group down for us): SIGKILL rank 1 in
    the middle of training; rank 0 must exit non-zero within the collective timeout, saying what
    happened and where the last checkpoint is; a relaunch resumes from that checkpoint."""
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COUPLING_DIST_TIMEOUT_S=str(KILL_TIMEOUT_S))
        log = open(tmp_path / f"out{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([PY, WORKER, "--dir", str(tmp_path), "--steps", "16", "--ckpt", "3",
                                       "--sleep", "0.2"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    t0 = time.time()
    while not _step_reached(tmp_path / "metrics.jsonl", 7):
        assert all(p.poll() is None for p in procs), "a rank ended early"
        assert time.time() - t0 < 240, "the run did not reach step 7"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        procs[0].wait(timeout=KILL_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise AssertionError("rank 0 hung after its peer died")
    waited = time.time() - t_kill
    out = (tmp_path / "out0.txt").read_text()
    assert procs[0].returncode == 1, out[-3000:]
    assert "lost contact with the other ranks" in out and "relaunch the same command to resume" in out, out[-3000:]
    assert waited < KILL_TIMEOUT_S + 30
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.split("_")[1])
    assert saved >= 6 and f"Last complete checkpoint: {tmp_path / 'checkpoints' / latest}" in out
    # the relaunch (the same command, under torchrun this time) resumes from that checkpoint
    torchrun(2, [WORKER, "--dir", str(tmp_path), "--steps", "16", "--ckpt", "3"], timeout=300)
    log = (tmp_path / "log.rank0.txt").read_text()
    assert f"{latest} at step {saved}" in log
    assert max(losses(tmp_path)) == 16


TEARDOWN_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from coupling_dist.components import dist as D
# registered before init_distributed's handler, so it runs after it (atexit is last-in, first-out)
atexit.register(lambda: print(f"rank {D.launch_env()['rank']} group alive at exit: {dist.is_initialized()}", flush=True))
D.init_distributed()
t = D.all_ok(True)  # one real collective
if sys.argv[1] == "raise" and D.rank() == 1:
    raise RuntimeError("boom")
if sys.argv[1] == "status":  # the exit status is known: leave at once after the teardown
    print(f"rank {D.rank()} done;", end="")  # neither a newline nor a flush: the exit must flush it
    D.set_exit_status(0)
"""


def test_process_group_teardown_is_registered_where_it_is_created(tmp_path):
    """Any process that calls init_distributed (a test worker, a user's script) leaves the group
    destroyed after a clean exit -- no gloo abort at interpreter teardown -- and leaves it alone
    after an uncaught error (a peer may still be inside a collective)."""
    script = tmp_path / "worker.py"
    script.write_text(TEARDOWN_SCRIPT)
    ok = torchrun(2, [str(script), "clean"], timeout=300)
    assert "rank 0 group alive at exit: False" in ok.stdout and "rank 1 group alive at exit: False" in ok.stdout
    bad = torchrun(2, [str(script), "raise"], timeout=300, check=False)
    assert bad.returncode != 0 and "boom" in bad.stderr
    assert "rank 1 group alive at exit: True" in bad.stdout and "rank 0 group alive at exit: False" in bad.stdout
    # with its exit status known, a clean rank skips interpreter finalization (where gloo's threads
    # aborted): the handler registered before ours never runs, the output is flushed, the status kept
    fast = torchrun(2, [str(script), "status"], timeout=300)
    assert "rank 0 done;" in fast.stdout and "rank 1 done;" in fast.stdout
    assert "group alive at exit" not in fast.stdout
