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
MAIN_DEMO = os.path.join(os.path.dirname(DEMO), "demo.yaml")
# The demo config (SmolLM2 tokenizer, compact vocabulary) with frozen features from the tiny Qwen2
# (so the shard set holds them), 600 sentences, a 3-step Stage A that keeps 2 checkpoints.
RUN = ["run.progress=false", "run.wandb.mode=disabled", "data.max_samples=600", "data.shard_size=128",
       "ray.num_workers=1", "encoder.model=tiny:qwen2", "encoder.dtype=float16", "stage_a.train.steps=3",
       "stage_a.train.warmup_steps=1", "stage_a.train.ckpt_interval=1", "stage_a.train.keep_last=2",
       "stage_a.train.eval_interval=100", "stage_a.train.batch_size=8"]
TOLERANCE = 0.10  # the bar: planned bytes within 10 % of what is on disk


def _by_name(plan) -> dict:
    return {(a.stage, a.name.split(" (")[0]): a for a in plan.artifacts}


def _close(planned: int, actual: int, what: str) -> None:
    assert actual > 0, what
    assert abs(planned - actual) <= TOLERANCE * actual, f"{what}: planned {planned:,} B, on disk {actual:,} B"


def test_planned_bytes_match_what_the_demo_stages_write(tmp_path):
    """The plan is made *before* anything runs (corpus counted and tokenized, stand-ins for the
    rest), then preprocess, stage_a and pair_store run through their entries; every artifact they
    write is within 10 % of the plan (measured: within 0.5 %)."""
    plan = build_plan(load_config(MAIN_DEMO, [f"run.dir={tmp_path}", *RUN]), MAIN_DEMO)
    assert plan.samples == 600 and plan.notes[0].startswith("samples: 600 (data.max_samples; the corpus has more")
    arts = _by_name(plan)
    ckpts = arts["stage_a", "checkpoints"]
    assert ckpts.peak == 3 * ckpts.bytes // 2  # one more exists while the next is saved
    out = {}
    for stage in ("preprocess", "stage_a", "pair_store"):
        out[stage] = run_module(f"coupling_dist.{stage}", "--config", MAIN_DEMO, f"run.dir={tmp_path}", *RUN,
                                timeout=900).stdout
    assert "[plan] preprocess will write: shard set" in out["preprocess"]
    assert "[plan] stage_a will write: checkpoints (2 kept)" in out["stage_a"]
    assert "[plan] pair_store will write: pair store" in out["pair_store"]
    for key, rel in ((("preprocess", "shard set"), "data"), (("stage_a", "checkpoints"), "stage_a/checkpoints"),
                     (("stage_a", "export"), "stage_a/export"), (("pair_store", "pair store"), "pair_store")):
        actual = existing_bytes(str(tmp_path / rel))
        print(f"{' '.join(key)}: planned {arts[key].bytes:,} B, on disk {actual:,} B")  # shown with -s
        _close(arts[key].bytes, actual, " ".join(key))


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
    # the features precomputed (the paper config's default is the online encoder)
    cfg = load_config(PAPER, [f"run.dir={tmp_path}", "stage_a.online_encoder=false"])
    plan = build_plan(cfg, PAPER, samples=30_000_000, accelerator=True)
    arts = _by_name(plan)
    shard_set = arts["preprocess", "shard set"].bytes
    raw = 30_000_000 * 128 * (896 * 2 + 4 + 1)  # features bf16 + tokens int32 + mask uint8, uncompressed
    assert 0.6 * raw < shard_set < raw  # zstd helps a little, tar headers cost a little
    comp = {c.stage: c for c in plan.compute}
    # Qwen2.5-0.5B, all 24 layers: 2 x 358M non-embedding params + attention, per token, over 30M x 128 tokens
    assert 2.6e18 < comp["preprocess"].flops < 3.0e18
    assert comp["stage_a"].steps == 200_000

    # the online encoder (stage_a.online_encoder): no stored features, the encoder's
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


def test_plan_of_a_patched_image_run(tmp_path):
    """MNIST-Binary (data.domain binary_image, stage_a.patch 16): the heads span the 2 pixel values,
    not a tokenizer's vocabulary, and the pair store holds 784 / 16 = 49 latent positions."""
    cfg = load_config("configs/mnist_demo.yaml", [f"run.dir={tmp_path}"])
    plan = build_plan(cfg, "configs/mnist_demo.yaml", samples=1000)
    arts = _by_name(plan)
    z_raw = 49 * cfg.stage_a.latent_dim * 4  # float32 [1, 49, 16]
    per_sample = arts["pair_store", "pair store"].bytes / 1000
    assert z_raw < per_sample < z_raw + 784 * 5 + 3 * 1024  # + tokens, mask and tar headers, never 784 latents
    assert arts["stage_a", "export"].bytes < 8e6  # ~1.4 M params: no 151k-row head


def test_plan_of_an_mlp_flow_conditioner(tmp_path):
    """stage_a.flow.conditioner mlp: the planner builds the model on the meta device (the coupling
    halves are index buffers made on the CPU) and counts the MLP flow's parameters in the export."""
    from coupling_dist.models.realnvp import RealNVP

    over = [f"run.dir={tmp_path}", "stage_a.flow.conditioner=mlp", "stage_a.flow.hidden=256", "stage_a.flow.depth=2"]
    cfg = load_config("configs/mnist_demo.yaml", over)
    assert cfg.stage_a.flow.positions == 49
    arts = _by_name(build_plan(cfg, "configs/mnist_demo.yaml", samples=1000))
    fc = cfg.stage_a.flow
    flow = RealNVP(cfg.stage_a.latent_dim, layers=fc.layers, hidden=256, depth=2, conditioner="mlp", positions=49)
    n_flow = sum(p.numel() for p in flow.parameters())
    assert n_flow > 1e6 and arts["stage_a", "export"].bytes > 4 * n_flow
