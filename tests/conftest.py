"""Shared test fixtures: configs rooted in tmp dirs, real multi-process launches, a real Ray head."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # fixtures shared with the benchmarks (tools/*_fixtures.py)
DEMO = os.path.join(ROOT, "configs", "tiny.yaml")
PY = sys.executable

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/coupling_dist/torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray >= 2.5x turns token auth on for a new local cluster and writes ~/.ray/auth_token; later
# heads then require a token that `ray job submit` clients here do not send. Loopback-only tests: off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def demo_cfg(tmp_path, *overrides):
    from coupling_dist.config import load_config

    return load_config(DEMO, [f"run.dir={tmp_path}", "run.wandb.mode=disabled", "run.progress=false", *overrides])


def free_port() -> int:
    from coupling_dist.components.dist import free_port as fp

    return fp()


def torchrun(nproc: int, args: list[str], *, env: dict | None = None, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``nproc`` real processes with torchrun on loopback (args: ['-m', 'module', ...] or a script)."""
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([PY, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head bound to loopback for the whole session; yields its address."""
    ray_bin = os.path.join(os.path.dirname(PY), "ray")
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    dash = free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           # the job agent's fixed default port (52365) collides with any other head on this machine
           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--include-dashboard=true",
           f"--temp-dir={tmp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        stop_ray_processes(str(tmp))


def ray_job_submit(head: dict, args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """``ray job submit --address <head> -- PY args...``; waits for the job and returns the CLI's result."""
    cmd = [os.path.join(os.path.dirname(PY), "ray"), "job", "submit", "--address", head["dashboard"], "--", PY, *args]
    for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(cmd, env=head["env"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def stop_ray_processes(marker: str) -> None:
    """Stop only the Ray processes of one head (their command lines name its temp dir); a plain
    ``ray stop`` would also kill other Ray instances running on this machine."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
