"""The run planner (``planning/``, ``python -m coupling_dist.plan``): its byte figures against what the
real stages write, the disk pre-flight of the stages that write, and the paper-scale table."""
from __future__ import annotations

import os
import types

import pytest

from conftest import DEMO, demo_cfg, run_module
from coupling_dist.components.preflight import PreflightError
from coupling_dist.config import load_config
from coupling_dist.planning import run_plan
from coupling_dist.planning.run_plan import build_plan, check_disk
from coupling_dist.planning.storage import existing_bytes

PAPER = os.path.join(os.path.dirname(DEMO), "lm1b_paper.yaml")
SMALL = ["data.max_samples=600", "data.shard_size=128", "ray.num_workers=1"]
TOLERANCE = 0.10  # the bar: planned bytes within 10 % of what is on disk


def _by_name(plan) -> dict:
    return {(a.stage, a.name.split(" (")[0]): a for a in plan.artifacts}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The plan made *before* anything ran (corpus counted, rows tokenized, stand-ins for the rest),
    then the real preprocess entry on the tiny config (600 sentences, 5 shards)."""
    run_dir = tmp_path_factory.mktemp("plan_run")
    cfg = demo_cfg(run_dir, *SMALL)
    plan = build_plan(cfg, DEMO)
    proc = run_module("coupling_dist.preprocess", "--config", DEMO, f"run.dir={run_dir}", "run.progress=false",
                      "run.wandb.mode=disabled", *SMALL, timeout=600)
    return {"dir": run_dir, "cfg": cfg, "plan": plan, "preprocess": proc}


def _close(planned: int, actual: int, what: str) -> None:
    assert actual > 0, what
    assert abs(planned - actual) <= TOLERANCE * actual, f"{what}: planned {planned:,} B, on disk {actual:,} B"


def test_planned_bytes_match_the_shard_set_the_export_and_the_pair_store(made, tmp_path):
    """preprocess and the pair store through their entries; the Stage A export is a freshly
    initialised Stage A of the config's architecture written by the real exporter (training it
    changes no byte count: the slow test below trains it)."""
    from pair_store_fixtures import export_random_stage_a

    run_dir, cfg, plan = made["dir"], made["cfg"], made["plan"]
    arts = _by_name(plan)
    assert plan.samples == 600 and plan.notes[0].startswith("samples: 600 (data.max_samples; the corpus has more")
    assert "[plan] preprocess will write: shard set" in made["preprocess"].stdout
    _close(arts["preprocess", "shard set"].bytes, existing_bytes(str(run_dir / "data")), "shard set")

    art = str(tmp_path / "stage_a_export")
    export_random_stage_a(art, str(run_dir / "data"), cfg.stage_a)
    _close(arts["stage_a", "export"].bytes, existing_bytes(art), "Stage A export")

    proc = run_module("coupling_dist.pair_store", "--config", DEMO, f"run.dir={run_dir}", "run.progress=false",
                      "run.wandb.mode=disabled", f"pair_store.artifact={art}", *SMALL, timeout=600)
    assert "[plan] pair_store will write: pair store" in proc.stdout
    _close(arts["pair_store", "pair store"].bytes, existing_bytes(str(run_dir / "pair_store")), "pair store")


@pytest.mark.slow
def test_planned_checkpoints_match_a_trained_stage_a(made):
    """Stage A trained through its entry (DeepSpeed ZeRO-2, fp32 on CPU): its kept checkpoints and export."""
    run_dir = made["dir"]
    over = ["stage_a.train.steps=3", "stage_a.train.ckpt_interval=1", "stage_a.train.keep_last=2",
            "stage_a.train.warmup_steps=1", "stage_a.train.eval_interval=100", "stage_a.train.batch_size=8"]
    plan = build_plan(demo_cfg(run_dir, *SMALL, *over), DEMO)
    arts = _by_name(plan)
    proc = run_module("coupling_dist.stage_a", "--config", DEMO, f"run.dir={run_dir}", "run.progress=false",
                      "run.wandb.mode=disabled", *SMALL, *over, timeout=900)
    assert "[plan] stage_a will write: checkpoints (2 kept)" in proc.stdout
    ckpts = arts["stage_a", "checkpoints"]
    assert ckpts.peak == 3 * ckpts.bytes // 2  # one more exists while the next is saved
    _close(ckpts.bytes, existing_bytes(str(run_dir / "stage_a" / "checkpoints")), "Stage A checkpoints")
    _close(arts["stage_a", "export"].bytes, existing_bytes(str(run_dir / "stage_a" / "export")), "Stage A export")


def test_disk_check_refuses_naming_path_need_free_and_the_override(tmp_path, monkeypatch, capsys):
    cfg = demo_cfg(tmp_path, "encoder.model=null")  # tokens only: nothing to load
    free = {"bytes": 10_000}
    monkeypatch.setattr(run_plan.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free["bytes"]))
    with pytest.raises(PreflightError) as e:
        check_disk(cfg, "preprocess", samples=2613)
    msg, out = str(e.value), capsys.readouterr().out
    data = os.path.join(str(tmp_path), "data")
    assert data in msg and "run.ignore_disk_check=true" in msg and "data.out_dir" in msg
    assert "10.00 kB (10,000 bytes) free" in msg and "preprocess needs" in msg
    assert "[plan] preprocess will write: shard set" in out and "2,613 samples" in out

    # the override: a warning, and the stage goes on
    check_disk(demo_cfg(tmp_path, "encoder.model=null", "run.ignore_disk_check=true"), "preprocess", samples=2613)
    assert "warning (run.ignore_disk_check=true)" in capsys.readouterr().out

    # a resumed run: bytes already written count as written
    need = check_disk(demo_cfg(tmp_path, "encoder.model=null", "run.ignore_disk_check=true"), "preprocess",
                      samples=2613, show=False)[0].bytes
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "shard-train-00000.tar"), "wb") as fh:
        fh.truncate(need)
    check_disk(cfg, "preprocess", samples=2613, show=False)  # fits now
    free["bytes"] = 0
    with open(os.path.join(data, "shard-train-00000.tar"), "wb") as fh:
        fh.truncate(need - 1)
    with pytest.raises(PreflightError, match=r"needs 1 B \(1 bytes\) more"):
        check_disk(cfg, "preprocess", samples=2613, show=False)


def test_corpus_count_exact_and_estimated(tmp_path, monkeypatch):
    """Small files are counted as preprocess reads them (blank lines are no samples); large ones
    are estimated from their first bytes; data.max_samples caps the count."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"sentence number {i} of the corpus\n" + ("\n" if i % 10 == 0 else "")
                              for i in range(3000)))
    cfg = demo_cfg(tmp_path, f"data.corpus={corpus}")
    assert run_plan.count_corpus(cfg) == (3000, "counted in the corpus (1 file(s))")
    monkeypatch.setattr(run_plan, "EXACT_BYTES", 1000)
    monkeypatch.setattr(run_plan, "SAMPLE_BYTES", 20_000)
    n, how = run_plan.count_corpus(cfg)
    assert abs(n - 3000) < 150 and how.startswith  # early lines are a little shorter here("estimated from the sentences in the first 20.00 kB")
    n, how = run_plan.count_corpus(demo_cfg(tmp_path, f"data.corpus={corpus}", "data.max_samples=100"))
    assert n == 100 and "data.max_samples" in how


def test_paper_plan_without_the_corpus(capsys, tmp_path):
    """The paper's LM1B run, its corpus and hub models absent: --samples, the built-in configs, a
    table with GPU-hours; without --samples one clear error."""
    from coupling_dist.cli import run_tool
    from coupling_dist.stages.plan.entry import add_arguments, main

    argv = ["--config", PAPER, "--samples", "30000000", "--gpus", "16", "--peak-flops", "989e12", "--mfu", "0.4",
            f"run.dir={tmp_path}"]
    assert run_tool("plan", main, add_arguments, argv) == 0
    out = capsys.readouterr().out
    assert "corpus not found" in out and "using --samples 30,000,000" in out
    assert "Qwen/Qwen2.5-0.5B: config not loadable here" in out and "built-in table" in out
    assert "0.85 epochs" in out and "GPU-hours" in out and "precision auto = bf16" in out
    cfg = load_config(PAPER, [f"run.dir={tmp_path}"])
    plan = build_plan(cfg, PAPER, samples=30_000_000, accelerator=True)
    arts = _by_name(plan)
    shard_set = arts["preprocess", "shard set"].bytes
    raw = 30_000_000 * 128 * (896 * 2 + 4 + 1)  # features bf16 + tokens int32 + mask uint8, uncompressed
    assert 0.6 * raw < shard_set < raw  # zstd helps a little, tar headers cost a little
    comp = {c.stage: c for c in plan.compute}
    # Qwen2.5-0.5B, all 24 layers: 2 x 358M non-embedding params + attention, per token, over 30M x 128 tokens
    assert 2.6e18 < comp["preprocess"].flops < 3.0e18
    assert comp["stage_a"].steps == 200_000

    # the online encoder (stage_a.online_encoder, read with getattr): no stored features, the encoder's
    # forward pass moves into Stage A (every training sample) and the pair store (every sample)
    cfg.stage_a.online_encoder = True
    online = build_plan(cfg, PAPER, samples=30_000_000, accelerator=True)
    oc, oa = {c.stage: c for c in online.compute}, _by_name(online)
    assert "preprocess" not in oc and oa["preprocess", "shard set"].bytes < shard_set / 50
    fwd = comp["preprocess"].flops / (30_000_000 * 128)  # encoder FLOPs per token
    t = cfg.stage_a.train
    evals = (t.steps // t.eval_interval) * t.eval_batches * t.batch_size
    assert oc["stage_a"].flops - comp["stage_a"].flops == pytest.approx(fwd * 128 * (t.batch_size * t.steps + evals))
    assert oc["pair_store"].flops - comp["pair_store"].flops == pytest.approx(comp["preprocess"].flops)

    assert run_tool("plan", main, add_arguments, ["--config", PAPER, f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.corpus") and "corpus not found" in err and "pass --samples N" in err
