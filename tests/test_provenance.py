"""Provenance (issue 14.2): a stage's marker records what it was made from; the pipeline re-runs a
stage whose inputs or config changed -- and, through the fingerprints, everything downstream --
saying why, moves the old directory aside first, and ``--force STAGE`` re-runs on purpose.

The real pair store runs on tiny inputs (the pair-store fixtures: a synthetic shard set and an
untrained Stage A export); Stage A "re-trains" by exporting another Stage A and writing its marker
as ``run_entry`` does; Stage B fails its pre-flight at once (the synthetic tokenizer is not the KD
teacher's), which is after the pipeline decided -- and said -- that it must re-run."""
from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import DEMO, run_module
from coupling_dist.components import paths, provenance
from coupling_dist.components.atomic import write_json
from coupling_dist.components.preflight import PreflightError
from coupling_dist.config import load_config
from coupling_dist.models.stage_a_export import artifact_hash
from pair_store_fixtures import export_random_stage_a, make_source

ARGS = ["pair_store.multiplicity=1", "pair_store.batch_size=8", "pair_store.report_samples=64",
        "run.wandb.mode=disabled", "run.progress=false"]


def _cfg(run_dir, *extra):
    return load_config(DEMO, [f"run.dir={run_dir}", *ARGS, *extra])


def _complete(cfg, stage: str) -> dict:
    """Mark ``stage`` complete exactly as ``cli.run_entry`` does (inputs at start, outputs at the end)."""
    rec = provenance.begin(cfg, stage)
    prov = provenance.complete(cfg, stage, rec)
    write_json(paths.completion_marker(cfg, stage), {"stage": stage, "summary": {}, "provenance": prov})
    return prov


def _pipeline(run_dir, stages, *extra, check=True):
    # a generous timeout: a starved shared machine can take minutes just to import torch
    return run_module("coupling_dist.pipeline", "--config", DEMO, f"run.dir={run_dir}", *ARGS,
                      f"pipeline.stages=[{','.join(stages)}]", *extra, check=check, timeout=900)


@pytest.fixture
def run_dir(tmp_path):
    """run.dir with a shard set at its default place and a complete Stage A (its export + marker)."""
    make_source(str(tmp_path / "data"))
    export_random_stage_a(str(tmp_path / "stage_a" / "export"), str(tmp_path / "data"), seed=0)
    _complete(_cfg(tmp_path), "stage_a")
    return tmp_path


def test_retrained_stage_a_reruns_pair_store_and_downstream_saying_why(run_dir):
    first = _pipeline(run_dir, ["stage_a", "pair_store"])
    assert "stage_a: already complete, skipping" in first.stdout
    old_store = json.load(open(run_dir / "pair_store" / "manifest.json"))
    old_a = provenance.marker_fingerprint(_cfg(run_dir), "stage_a")
    # a finished Stage B on top of this pair store (its export present, its marker recorded)
    os.makedirs(run_dir / "stage_b" / "export")
    (run_dir / "stage_b" / "export" / "config.json").write_text("{}")
    os.makedirs(run_dir / "stage_b" / "checkpoints" / "step_6")
    _complete(_cfg(run_dir), "stage_b")

    # Stage A is trained again: a new export, and its marker says so
    export_random_stage_a(str(run_dir / "stage_a" / "export"), str(run_dir / "data"), seed=1)
    _complete(_cfg(run_dir), "stage_a")
    new_a = provenance.marker_fingerprint(_cfg(run_dir), "stage_a")
    assert new_a != old_a

    proc = _pipeline(run_dir, ["stage_a", "pair_store", "stage_b"], check=False)
    out = proc.stdout
    assert "stage_a: already complete, skipping" in out
    assert f"pair_store: re-running, input stage_a export changed ({old_a[:12]} -> {new_a[:12]})" in out, out[-3000:]
    assert "stage_b: re-running, input pair store changed" in out, out[-3000:]
    # the pair store was rebuilt from the new export; the old one and Stage B's old run are kept aside
    new_store = json.load(open(run_dir / "pair_store" / "manifest.json"))
    new_sha = artifact_hash(str(run_dir / "stage_a" / "export"))
    assert new_store["stage_a_artifact"]["sha256"] == new_sha != old_store["stage_a_artifact"]["sha256"]
    stale_store = glob.glob(str(run_dir / "pair_store.stale-*"))
    assert len(stale_store) == 1 and json.load(open(os.path.join(stale_store[0], "manifest.json"))) == old_store
    stale_b = glob.glob(str(run_dir / "stage_b.stale-*"))
    assert len(stale_b) == 1 and os.path.isdir(os.path.join(stale_b[0], "checkpoints", "step_6"))
    assert f"moved the previous {run_dir / 'stage_b'} aside to {stale_b[0]}" in out
    # Stage B started fresh (nothing of the old run to resume) and failed its pre-flight: not complete
    assert proc.returncode == 2 and not (run_dir / "stage_b" / "checkpoints").exists()
    assert not (run_dir / "stage_b" / paths.COMPLETE).exists()


def test_unchanged_inputs_skip_config_change_and_force_rerun(run_dir):
    _pipeline(run_dir, ["stage_a", "pair_store"])
    again = _pipeline(run_dir, ["stage_a", "pair_store"])
    assert "pair_store: already complete, skipping" in again.stdout and "re-running" not in again.stdout
    changed = _pipeline(run_dir, ["stage_a", "pair_store"], "pair_store.multiplicity=2")
    assert "pair_store: re-running, config pair_store.multiplicity changed (1 -> 2)" in changed.stdout
    assert json.load(open(run_dir / "pair_store" / "manifest.json"))["fields"]["z"]["shape"][0] == 2
    forced = _pipeline(run_dir, ["stage_a", "pair_store"], "pair_store.multiplicity=2", "--force", "stage_a",
                       check=False)
    # --force stage_a re-runs Stage A and its dependents: here Stage A's own pre-flight then refuses
    # (the synthetic shards were not made by the demo's encoder), after the pipeline said why
    assert "stage_a: re-running, forced (--force stage_a)" in forced.stdout, forced.stdout[-3000:]
    assert forced.returncode == 2 and "error:" in forced.stderr
    assert len(glob.glob(str(run_dir / "stage_a.stale-*"))) == 1
    bad = _pipeline(run_dir, ["stage_a", "pair_store"], "--force", "stage_b", check=False)
    assert bad.returncode == 2 and "--force 'stage_b'" in bad.stderr


def test_dependents_follow_the_inputs():
    cfg = load_config(DEMO, ["run.dir=/tmp/x"])
    stages = list(cfg.pipeline.stages)
    assert provenance.dependents(cfg, "stage_a", stages) == ["stage_a", "pair_store", "stage_b", "sample", "evaluate"]
    assert provenance.dependents(cfg, "stage_b", stages) == ["stage_b", "sample", "evaluate"]
    # a pair store made from an external artifact does not depend on this run's Stage A
    cfg = load_config(DEMO, ["run.dir=/tmp/x", "pair_store.artifact=/elsewhere", "evaluate.stage_a_series=false"])
    assert provenance.dependents(cfg, "stage_a", stages) == ["stage_a"]


def test_stage_started_by_hand_refuses_checkpoints_from_other_inputs(tmp_path):
    """Without the pipeline: a partial Stage B whose pair store changed is not resumed silently."""
    cfg = _cfg(tmp_path)
    store = tmp_path / "pair_store"
    store.mkdir()
    (store / "manifest.json").write_text('{"v": 1}')
    provenance.begin(cfg, "stage_b")  # the first run started ...
    os.makedirs(tmp_path / "stage_b" / "checkpoints" / "step_3")  # ... and checkpointed
    assert provenance.stale_reason(cfg, "stage_b", None) is None
    (store / "manifest.json").write_text('{"v": 2}')  # the pair store is rebuilt
    assert "input pair store changed" in provenance.stale_reason(cfg, "stage_b", None)
    with pytest.raises(PreflightError, match="holds checkpoints of a run made from other inputs .input pair store"):
        provenance.begin(cfg, "stage_b")
    provenance.begin(_cfg(tmp_path, "stage_b.train.resume=" + str(tmp_path / "stage_b" / "checkpoints" / "step_3")),
                     "stage_b")  # an explicit resume is the user's call
