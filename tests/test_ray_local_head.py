"""Trying Ray on one machine as the README says: the commands of its local-head block, run as
written, from a shell without the venv activated and without any Ray variable set."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import pytest

from conftest import PY, ROOT, free_port, stop_ray_processes
from stage_b_fixtures import make_pair_store


def readme_local_head_block() -> list[str]:
    """The command lines of the README's fenced block that starts the local head."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if lines and lines[0].startswith("cluster/ray/local_head.sh start"):
            return lines
    raise AssertionError("README.md has no ```bash block starting with `cluster/ray/local_head.sh start`")


def test_readme_block_is_the_documented_recipe():
    lines = readme_local_head_block()
    assert lines == ["cluster/ray/local_head.sh start", "export RAY_AUTH_MODE=token",
                     ".venv/bin/ray job submit --address http://127.0.0.1:8265 -- python -m coupling_dist.stage_b "
                     "--config configs/tiny.yaml", "cluster/ray/local_head.sh stop"]


@pytest.mark.slow
def test_readme_ray_local_head_recipe_from_a_plain_shell(tmp_path):
    """``local_head.sh start``, the one client variable, ``ray job submit ... stage_b --config
    configs/tiny.yaml`` (plus overrides for a short run): the job is accepted (token authentication
    on), runs the venv's python on the head, and trains with 2 Ray-actor ranks. Without the variable
    the same submit is refused. Ports and the temp dir are private to this test (the head's knobs),
    and only this head is stopped (the README's ``stop`` is ``ray stop``: every Ray process of the user)."""
    lines = readme_local_head_block()
    start, export, submit = lines[0], lines[1], lines[2]
    venv = os.path.join(ROOT, ".venv") if os.path.isfile(os.path.join(ROOT, ".venv", "bin", "ray")) \
        else os.path.dirname(os.path.dirname(PY))
    dash = free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    make_pair_store(str(tmp_path), n_train=16, n_heldout=8, shard_size=8)
    run_dir = str(tmp_path)
    overrides = [f"run.dir={run_dir}", "run.progress=false", "run.wandb.mode=disabled", "stage_b.train.steps=2",
                 "stage_b.train.warmup_steps=1", "stage_b.train.batch_size=4", "stage_b.train.peak_flops=1e12",
                 "stage_b.kd.weight=0", "stage_b.train.eval_interval=1000"]
    submit = submit.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dash}").replace(".venv/bin/ray",
                                                                                        f"{venv}/bin/ray")
    submit = f"{submit} {' '.join(overrides)}"
    # a plain login shell: no venv on PATH, no PYTHONPATH, no RAY_* variables
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "COUPLING_DIST_VENV": venv, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_AGENT_PORT": str(free_port()), "RAY_TEMP_DIR": temp, "RAY_NUM_CPUS": "4"}
    for k in ("COUPLING_DIST_CACHE", "TORCH_EXTENSIONS_DIR"):  # the suite's caches (defaults: under HOME)
        if os.environ.get(k):
            env[k] = os.environ[k]

    def sh(script: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    try:
        head = sh(start, 180)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        assert "export RAY_AUTH_MODE=token" in head.stdout  # the one variable, told to the user
        refused = sh(f"{submit.split(' -- ')[0]} -- python -c pass", 120)  # no token sent: refused
        assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr
        job = None
        for _ in range(20):  # the head's job agent comes up a few seconds after `ray start` returns
            job = sh(f"set -e\n{export}\n{submit}", 900)
            if "No available agent" not in job.stdout + job.stderr:
                break
        out = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in job.stdout, out[-6000:]
        assert "No module named" not in out
        done = json.load(open(os.path.join(run_dir, "stage_b", "_COMPLETE.json")))
        assert done["summary"]["launcher"] == "ray" and done["summary"]["ray_workers"] == 2
        assert os.path.isfile(os.path.join(run_dir, "stage_b", "export", "model.safetensors"))
    finally:
        stop_ray_processes(temp)
