"""The quality benchmark end to end at plumbing size (slow: ~5 min): every stage through its entry
module with the token-embedding encoder, the composite generator and a masked denoiser, samples
scored by the grammar checker. Checks the wiring and the reference rows, not quality."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_quality_quick_runs_every_row(tmp_path):
    out = tmp_path / "bq"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_quality.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    rows = res["rows"]
    assert rows["data (held-out)"]["valid"] == 1.0 and rows["factorized baseline"]["valid"] < 0.02
    assert {"Stage A only, greedy, s=0.7", "one-step, greedy, s=0.7", "one-step, greedy, s=0.5",
            "one-step, greedy, s=0.8", "P2-self K=4, greedy, s=0.7"} <= set(rows)
    assert res["args"]["flow_conditioner"] == "mlp" and 0 < res["times_s"]["to_one_step_rows"] < res["times_s"]["total"]
    assert all(r["n"] == 200 for name, r in rows.items() if name != "data (held-out)")
    assert [c["step"] for c in res["curve"]] == [0, 20, 40]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished benchmark directory is never overwritten
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_quality.py"), "--quick", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "finished benchmark" in again.stderr
