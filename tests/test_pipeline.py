"""Pipeline orchestration and pre-flight behaviour (fast: stages are stubbed by markers or fail early)."""
from __future__ import annotations

import json
import os

import pytest

from conftest import DEMO, run_module
from coupling_dist.components.paths import COMPLETE
from coupling_dist.components.preflight import PreflightError, check_writable
from coupling_dist.config import PIPELINE_STAGES, load_config
from coupling_dist.stages.pipeline.entry import stage_command


def _mark(run_dir, stage, summary):
    cfg = load_config(DEMO, [f"run.dir={run_dir}"])
    d = cfg.stage_dir(stage)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, COMPLETE), "w") as fh:
        json.dump({"stage": stage, "summary": summary}, fh)


def test_pipeline_skips_complete_stages_and_prints_table(tmp_path):
    for i, stage in enumerate(PIPELINE_STAGES):
        _mark(tmp_path, stage, {"metric": float(i) + 0.5})
    (tmp_path / "sample" / "samples.jsonl").write_text(
        "".join(json.dumps({"index": i, "text": f"sample number {i}"}) + "\n" for i in range(8)))
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"rows": [
        {"name": "K1_s0.6_p0.95_t0.5", "kind": "sweep", "gen_ppl": 2911.43, "entropy": 2.685},
        {"name": "factorized", "kind": "factorized", "gen_ppl": 46721.3, "entropy": 2.702}]}))
    proc = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path}")
    for stage in PIPELINE_STAGES:
        assert f"{stage}: already complete, skipping" in proc.stdout
    assert "skipped (complete)" in proc.stdout and "metric=5.5" in proc.stdout
    assert "frontier plot:" in proc.stdout
    # the closing summary shows what was generated: the first samples and the evaluation's rows
    assert "'sample number 4'" in proc.stdout and "sample number 5" not in proc.stdout
    assert "factorized" in proc.stdout and "46721.3" in proc.stdout and "2911.4" in proc.stdout


def test_restricted_stages_list_only_their_outputs(tmp_path):
    """With ``pipeline.stages`` cut to the first two, the closing summary names what they wrote and
    nothing the run did not make (no samples, metrics table or plot)."""
    for stage in PIPELINE_STAGES:  # even with every stage complete on disk
        _mark(tmp_path, stage, {"metric": 1.0})
    proc = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path}",
                      "pipeline.stages=[preprocess,stage_a]")
    tail = proc.stdout.split("stage_a: already complete, skipping")[1]
    assert "shard set:" in tail and os.path.join(str(tmp_path), "data", "manifest.json") in tail
    assert "Stage A export:" in tail and os.path.join(str(tmp_path), "stage_a", "export") in tail
    for other in ("pair store:", "generator:", "samples:", "metrics table:", "frontier plot:", "sample.jsonl",
                  "results.csv"):
        assert other not in tail, (other, tail)


def test_failed_stage_stops_pipeline_and_is_not_marked(tmp_path):
    # preprocess on a corpus that does not exist fails; nothing after it runs, no marker written,
    # and an earlier stage's output is left intact.
    keep = tmp_path / "keep.txt"
    keep.write_text("earlier output")
    proc = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path}",
                      "data.corpus=/nonexistent/corpus.txt", "pipeline.stages=[preprocess,stage_a]", check=False)
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
    assert "stage_a" not in proc.stdout.split("FAILED")[-1].split("\n")[0]  # stage_a did not run
    assert not (tmp_path / "preprocess" / COMPLETE).exists()
    assert keep.read_text() == "earlier output"


def test_unknown_stage_and_bad_key_fail_before_work(tmp_path):
    proc = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path}",
                      "pipeline.stages=[preprocess,stage_c]", check=False)
    assert proc.returncode == 2 and "'pipeline.stages'" in proc.stderr and "stage_c" in proc.stderr
    proc = run_module("coupling_dist.stage_a", "--config", DEMO, f"run.dir={tmp_path}",
                      "stage_a.train.stepz=3", check=False)
    assert proc.returncode == 2 and "stage_a.train.stepz" in proc.stderr and "tiny.yaml" in proc.stderr
    assert not (tmp_path / "stage_a" / "checkpoints").exists()


def test_unwritable_or_full_run_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match="not writable"):
        check_writable(str(blocker / "run"))
    proc = run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={blocker}/run", check=False)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    proc = run_module("coupling_dist.stage_a", "--config", DEMO, f"run.dir={tmp_path}/r",
                      env={"COUPLING_DIST_MIN_FREE_MB": str(10**12)}, check=False)
    assert proc.returncode == 2 and "MiB free" in proc.stderr


def test_stage_commands_per_launcher(tmp_path):
    cfg = load_config(DEMO, [f"run.dir={tmp_path}", "pipeline.nproc=2"])
    cmd = stage_command("stage_b", cfg, DEMO, ["x=1"])
    assert "torch.distributed.run" in cmd and "--nproc_per_node=2" in cmd and cmd[-1] == "x=1"
    assert "torch.distributed.run" not in stage_command("preprocess", cfg, DEMO, [])
    cfg = load_config(DEMO, [f"run.dir={tmp_path}", "pipeline.launcher=srun"])
    assert stage_command("stage_a", cfg, DEMO, [])[0] == "srun"
    cfg = load_config(DEMO, [f"run.dir={tmp_path}"])
    assert stage_command("stage_a", cfg, DEMO, [])[1:3] == ["-m", "coupling_dist.stage_a"]


def test_paper_config_loads():
    cfg = load_config(os.path.join(os.path.dirname(DEMO), "lm1b_paper.yaml"))
    assert cfg.data.seq_len == 128 and cfg.stage_a.latent_dim == 256
    assert cfg.stage_a.flow.layers == 12 and cfg.stage_a.flow.hidden == 1024
    m = cfg.stage_b.model
    assert (m.width, m.depth, m.heads, m.ffn) == (768, 12, 12, 2048)
    assert cfg.stage_b.train.restart_every == 50000 and cfg.stage_b.train.ema_decay == 0.999
    # Table 7 / §G.3 and Table 6: mixing 0.30 x 0.90 of updates, the paper's evaluation protocol and sweep
    sb, e = cfg.stage_b, cfg.evaluate
    assert (sb.latent_mix_prob, sb.latent_mix_scale, sb.latent_mix_unit) == (0.3, 0.9, "update")
    assert cfg.stage_a.pad_positions == "encoded" and sb.pad_weight == 1.0
    assert e.protocol == "paper" and e.latent_scales == [0.8] and e.top_ps == [0.95] and e.num_samples == 1024
    assert e.temperatures == [0.5, 0.6, 0.65, 0.7] and e.reference  # real test sentences, not training text


# ----------------------------------------------------------------------------- whole pipeline (slow)

QUICK = ["run.progress=false", "stage_a.train.steps=6", "stage_a.train.ckpt_interval=3", "stage_a.train.eval_interval=3",
         "stage_b.train.steps=6", "stage_b.train.ckpt_interval=3", "stage_b.train.eval_interval=3",
         "sample.num_samples=16", "evaluate.num_samples=16", "evaluate.temperatures=[0.6]"]


def _check_outputs(run_dir) -> dict:
    done = {}
    for stage in PIPELINE_STAGES:
        cfg = load_config(DEMO, [f"run.dir={run_dir}"])
        with open(os.path.join(cfg.stage_dir(stage), COMPLETE)) as fh:
            done[stage] = json.load(fh)["summary"]
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "sample", "samples.jsonl"))]
    assert len(rows) == 16 and all("text" in r for r in rows)
    res = json.load(open(os.path.join(run_dir, "eval", "results.json")))
    assert any(r["kind"] == "file" and r["gen_ppl"] > 1 for r in res["rows"])
    assert open(os.path.join(run_dir, "eval", "frontier.png"), "rb").read(4) == b"\x89PNG"
    assert os.path.isfile(os.path.join(run_dir, "pair_store", "report.json"))
    return done


@pytest.mark.slow
def test_ray_job_submit_runs_the_whole_pipeline(tmp_path, ray_head):
    """``ray job submit -- python -m coupling_dist.pipeline`` against a real loopback head: every
    stage runs on the cluster (rank-based stages as Ray-actor ranks) and the outputs are complete."""
    from conftest import ray_job_submit

    proc = ray_job_submit(ray_head, ["-m", "coupling_dist.pipeline", "--config", DEMO, f"run.dir={tmp_path}", *QUICK])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    done = _check_outputs(tmp_path)
    for stage in ("stage_a", "pair_store", "stage_b", "sample"):
        assert done[stage].get("launcher") == "ray" and done[stage].get("ray_workers") == 2, (stage, done[stage])
    assert "frontier plot:" in proc.stdout  # the pipeline's closing summary is in the job log
