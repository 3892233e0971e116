"""Errors in the user's inputs end a run with exit status 2 and ONE line -- ``error: ...`` naming the
file (and line, key, shard or sample) and the fix -- without a traceback; ``--debug`` (or
``COUPLING_DIST_DEBUG=1``) adds the traceback. Each case runs the real entry as a user would."""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import DEMO, demo_cfg, run_module
from stage_b_fixtures import make_pair_store

from coupling_dist.components.preflight import DEBUG_ENV, InputError, check_export

QUIET = ["run.progress=false", "run.wandb.mode=disabled"]


def _fails_cleanly(proc, *must: str, debug: bool = False) -> str:
    """Exit 2, exactly one ``error:`` line holding every string of ``must``; a traceback only with debug."""
    out = proc.stderr
    errs = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-4000:]}"
    assert len(errs) == 1, out[-4000:]
    for m in must:
        assert m in errs[0], (m, errs[0])
    assert ("Traceback (most recent call last)" in out) == debug, out[-4000:]
    return errs[0]


# --------------------------------------------------------------------------- config file


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"run:\n  dir: runs/caf\xe9\n")
    proc = run_module("coupling_dist.stage_a", "--config", str(bad), check=False, timeout=900)
    _fails_cleanly(proc, str(bad), "line 2", "not UTF-8", "save the config as UTF-8")
    proc = run_module("coupling_dist.stage_a", "--debug", "--config", str(bad), check=False, timeout=900)
    _fails_cleanly(proc, str(bad), "line 2", debug=True)


# --------------------------------------------------------------------------- corpus (preprocess)


def _corpus(tmp_path, kind: str) -> tuple[str, list[str]]:
    """(corpus file, strings the error line must hold)."""
    if kind == "invalid_utf8":
        p = tmp_path / "c.txt"
        p.write_bytes(b"A fine first sentence.\nsecond caf\xe9 line\n")
        return str(p), [f"{p}: line 2: not valid UTF-8", "re-encode the file as UTF-8"]
    if kind == "binary":
        p = tmp_path / "c.txt"
        p.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\n")
        return str(p), [f"{p}: line 1", "binary file"]
    if kind == "jsonl_field":
        p = tmp_path / "c.jsonl"
        p.write_text(json.dumps({"text": "One sentence here."}) + "\n" + json.dumps({"body": "another"}) + "\n")
        return str(p), [f"{p}: line 2: no 'text' field (has ['body'])", "set data.text_field"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sentence": ["One sentence here.", "Another one."]}), str(p))
    return str(p), [f"{p}: no column 'text' (columns: ['sentence'])", "set data.text_field"]


@pytest.mark.parametrize("kind", ["invalid_utf8", "binary", "jsonl_field", "parquet_column"])
def test_corpus_errors(tmp_path, kind):
    path, must = _corpus(tmp_path, kind)
    args = ["--config", DEMO, f"run.dir={tmp_path / 'run'}", f"data.corpus={path}", "encoder.model=null", *QUIET]
    proc = run_module("coupling_dist.preprocess", *args, check=False, timeout=900)
    _fails_cleanly(proc, *must)
    if kind == "invalid_utf8":  # the traceback on request, through the environment variable as well
        proc = run_module("coupling_dist.preprocess", *args, env={DEBUG_ENV: "1"}, check=False, timeout=900)
        _fails_cleanly(proc, *must, debug=True)
        assert "CorpusError" in proc.stderr


# --------------------------------------------------------------------------- shards, resume (stage_b)

STAGE_B = ["--config", DEMO, *QUIET, "stage_b.train.steps=2", "stage_b.train.warmup_steps=1", "stage_b.train.batch_size=4",
           "stage_b.train.peak_flops=1e12", "stage_b.kd.weight=0", "stage_b.train.eval_interval=1000"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    make_pair_store(str(base), n_train=16, n_heldout=8, shard_size=8)
    return os.path.join(str(base), "pair_store")


def _run_with_store(tmp_path, store) -> str:
    import shutil

    shutil.copytree(store, tmp_path / "pair_store")
    return str(tmp_path / "pair_store")


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_shard_errors(tmp_path, store, fault):
    ps = _run_with_store(tmp_path, store)
    shard = os.path.join(ps, "shard-train-00001.tar")
    if fault == "truncated":
        with open(shard, "r+b") as fh:
            fh.truncate(os.path.getsize(shard) // 2)
        must = ["shard shard-train-00001.tar", "manifest mismatch", shard, "re-run the stage that wrote"]
    else:
        os.remove(shard)
        must = ["shard shard-train-00001.tar", f"missing from disk ({shard})", "loader.skip_bad=true"]
    proc = run_module("coupling_dist.stage_b", *STAGE_B, f"run.dir={tmp_path}", check=False, timeout=900)
    _fails_cleanly(proc, *must)


def test_shard_with_the_wrong_sample_count(tmp_path, store):
    """The manifest's count disagrees with the file (found when the shard is first read, mid-run)."""
    ps = _run_with_store(tmp_path, store)
    man_path = os.path.join(ps, "manifest.json")
    man = json.load(open(man_path))
    for s in man["shards"]:
        if s["name"] == "shard-train-00000.tar":
            s["count"] = 9
    json.dump(man, open(man_path, "w"))
    proc = run_module("coupling_dist.stage_b", *STAGE_B, f"run.dir={tmp_path}", check=False, timeout=900)
    _fails_cleanly(proc, "shard shard-train-00000.tar", "manifest lists 9 samples but the file holds 8", man_path)


def test_resume_pointing_nowhere(tmp_path, store):
    _run_with_store(tmp_path, store)
    nowhere = tmp_path / "no_such_checkpoint"
    proc = run_module("coupling_dist.stage_b", *STAGE_B, f"run.dir={tmp_path}", f"stage_b.train.resume={nowhere}",
                      check=False, timeout=900)
    _fails_cleanly(proc, f"stage_b.train.resume: '{nowhere}' is not a complete checkpoint", "does not exist",
                   "stage_b.train.resume=none")
    assert not os.path.exists(tmp_path / "stage_b" / "_COMPLETE.json")


# --------------------------------------------------------------------------- exports (sample, pair_store)


def _tiny_export(path, truncate: bool) -> str:
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"format": "x"}, fh)
    w = os.path.join(path, "model.safetensors")
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(10)}, w)
    if truncate:
        with open(w, "r+b") as fh:
            fh.truncate(os.path.getsize(w) - 100)
    return w


def test_check_export_names_the_file(tmp_path):
    ok = _tiny_export(tmp_path / "ok", truncate=False)
    check_export(os.path.dirname(ok), "export", "fix it")
    w = _tiny_export(tmp_path / "cut", truncate=True)
    with pytest.raises(InputError, match=rf"export damaged: {w} is \d+ bytes, but its header describes \d+ "
                                         rf"\(truncated or damaged\); fix it"):
        check_export(os.path.dirname(w), "export", "fix it")
    with open(w, "wb") as fh:
        fh.write(b"\x01\x02")
    with pytest.raises(InputError, match="only 2 bytes"):
        check_export(os.path.dirname(w), "export", "fix it")
    os.remove(w)
    with pytest.raises(InputError, match=f"export incomplete: {w} is missing"):
        check_export(os.path.dirname(w), "export", "fix it")


def test_missing_generator_export(tmp_path):
    proc = run_module("coupling_dist.sample", "--config", DEMO, f"run.dir={tmp_path}", *QUIET, check=False, timeout=900)
    _fails_cleanly(proc, f"generator export not found: {tmp_path / 'stage_b' / 'export'} does not exist",
                   "run `python -m coupling_dist.stage_b`")


def test_truncated_generator_export(tmp_path):
    w = _tiny_export(tmp_path / "stage_b" / "export", truncate=True)
    proc = run_module("coupling_dist.sample", "--config", DEMO, f"run.dir={tmp_path}", *QUIET, check=False, timeout=900)
    _fails_cleanly(proc, f"generator export damaged: {w} is", "truncated", "run `python -m coupling_dist.stage_b`")
    proc = run_module("coupling_dist.sample", "--debug", "--config", DEMO, f"run.dir={tmp_path}", *QUIET, check=False,
                      timeout=900)
    _fails_cleanly(proc, f"generator export damaged: {w} is", debug=True)


def test_truncated_stage_a_export(tmp_path):
    w = _tiny_export(tmp_path / "stage_a" / "export", truncate=True)
    proc = run_module("coupling_dist.pair_store", "--config", DEMO, f"run.dir={tmp_path}", *QUIET, check=False,
                      timeout=900)
    _fails_cleanly(proc, f"Stage A export damaged: {w} is", "run `python -m coupling_dist.stage_a`")


# --------------------------------------------------------------------------- Ray ranks


def _rank_with_bad_input(cfg):
    """Rank 1 finds a bad input; rank 0 waits in a collective for it (as a real peer would)."""
    from coupling_dist.components import dist as D

    D.init_distributed()
    if D.rank() == 1:
        raise InputError("shard shard-train-00003.tar, sample key 000000042: truncated tar; re-run preprocess")
    D.barrier()
    return {}


@pytest.mark.parametrize("debug", [False, True])
def test_ray_rank_input_error_is_one_line_and_status_2(tmp_path, ray_head, monkeypatch, capsys, debug):
    """Under Ray (``ray job submit`` / ``ray_workers``) a rank's input error ends the job with the
    same single line and status 2; the peer blocked in a collective is stopped after the grace
    period instead of waiting for the collective timeout."""
    import ray.cloudpickle

    from coupling_dist.components.ray_launch import launch_ranks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import tests/
    monkeypatch.setenv("COUPLING_DIST_RAY_GRACE_S", "600")  # rank 0 must end because rank 1 ended
    if debug:
        monkeypatch.setenv(DEBUG_ENV, "1")  # forwarded to the actors: the rank's traceback comes back
    cfg = demo_cfg(tmp_path, f"ray.address={ray_head['address']}")
    with pytest.raises(SystemExit) as exc:
        launch_ranks(cfg, _rank_with_bad_input, 2, "stage_x")
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error")]
    assert err == ["error: shard shard-train-00003.tar, sample key 000000042: truncated tar; re-run preprocess"], err
    assert ("Traceback (most recent call last)" in stderr and "_rank_with_bad_input" in stderr) == debug, stderr
