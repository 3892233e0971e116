"""Stage A through its real entry: preprocessed shards of real text -> 2 gloo ranks under DeepSpeed
ZeRO -> sharded checkpoints -> export; and the pre-flight refusals of shards that do not fit."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import DEMO, demo_cfg, run_module, torchrun

FAST = ["run.wandb.mode=disabled", "run.progress=false", "run.log_interval=1", "stage_a.train.eval_interval=1000",
        "stage_a.train.warmup_steps=1", "stage_a.train.lr=3e-3", "stage_a.train.batch_size=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Real Lee-corpus sentences, real Qwen tokenizer, tiny random Qwen2 features (200 samples)."""
    d = tmp_path_factory.mktemp("stage_a_data")
    run_module("coupling_dist.preprocess", "--config", DEMO, f"run.dir={d}", "data.max_samples=200",
               "run.progress=false", "run.wandb.mode=disabled", timeout=600)
    return str(d / "data")


def _losses(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "stage_a", "metrics.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def _train(tmp_path, data_dir, zero: int, steps: int, *extra: str):
    torchrun(2, ["-m", "coupling_dist.stage_a", "--config", DEMO, f"run.dir={tmp_path}", f"data.out_dir={data_dir}",
                 f"stage_a.train.zero_stage={zero}", f"stage_a.train.steps={steps}",
                 f"stage_a.train.ckpt_interval={steps}", *FAST, *extra], timeout=900)


def test_zero2_two_ranks_train_the_demo_config_and_export(tmp_path, data_dir):
    from coupling_dist.models.stage_a_export import load_stage_a

    _train(tmp_path, data_dir, zero=2, steps=8)
    rows = _losses(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = rows[0], rows[-1]
    # the terms fall (the total need not: lambda_flow ramps 0.5 -> 1 over these steps)
    assert last["bpd"] < first["bpd"] - 0.2 and last["ce"] < first["ce"], (first, last)
    assert all(k in last for k in ("flow_nll", "kl", "bpd", "lambda_flow", "mfu", "tokens_per_s"))
    ck = tmp_path / "stage_a" / "checkpoints" / "step_00000008"
    marker = json.loads((ck / "complete.json").read_text())
    assert marker["dp_world"] == 2 and marker["zero_stage"] == 2
    assert sum("optim_states" in n for n in os.listdir(ck)) == 2  # one optimizer shard per rank
    model, meta = load_stage_a(str(tmp_path / "stage_a" / "export"), torch.device("cpu"))
    assert meta["latent_dim"] == 16 and meta["seq_len"] == 32 and meta["weights"] == "live"
    done = json.loads((tmp_path / "stage_a" / "_COMPLETE.json").read_text())
    assert done["summary"]["steps"] == 8


def test_mlp_flow_conditioner_trains_on_two_ranks_and_exports(tmp_path, data_dir):
    """stage_a.flow.conditioner mlp through the real entry (2 ranks, ZeRO-2): the export reloads
    strictly (the coupling indices are rebuilt from the config, not stored) and its flow inverts.
    With stage_a.train.ema_decay the export holds the EMA weights, not the live ones."""
    from coupling_dist.models.stage_a_export import load_stage_a

    _train(tmp_path, data_dir, 2, 3, "stage_a.flow.conditioner=mlp", "stage_a.flow.hidden=64", "stage_a.flow.depth=2",
           "stage_a.train.ema_decay=0.5")
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3]
    model, meta = load_stage_a(str(tmp_path / "stage_a" / "export"), torch.device("cpu"))
    assert model.flow.conditioner == "mlp" and model.flow.positions == meta["seq_len"] == 32
    assert meta["weights"] == "ema"
    live = torch.load(tmp_path / "stage_a" / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                      weights_only=True, map_location="cpu")["module"]
    name = "flow.layers.0.out.weight"
    assert not torch.equal(live["model." + name].float(), model.state_dict()[name])  # the average, not the last step
    u = torch.randn(2, 32, meta["latent_dim"])
    with torch.no_grad():
        z, _ = model.flow(u)
        assert (z - u).abs().max() > 1e-4  # trained away from the identity it starts as
        torch.testing.assert_close(model.flow.inverse(z), u, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_zero1_and_zero3_run(tmp_path, data_dir, zero):
    _train(tmp_path, data_dir, zero=zero, steps=3)
    ck = tmp_path / "stage_a" / "checkpoints" / "step_00000003"
    assert json.loads((ck / "complete.json").read_text())["zero_stage"] == zero
    if zero == 3:  # model states are sharded too
        assert sum("model_states" in n for n in os.listdir(ck)) == 2
    assert os.path.isdir(tmp_path / "stage_a" / "export")


def test_mismatched_features_or_tokenizer_refused_before_training(tmp_path, data_dir):
    from coupling_dist.components.preflight import PreflightError
    from coupling_dist.stages.stage_a.preflight import preflight

    base = [f"data.out_dir={data_dir}"]
    preflight(demo_cfg(tmp_path, *base))  # the matching config passes
    with pytest.raises(PreflightError, match=r"features were made by encoder 'tiny:qwen2'.*tiny:qwen2:hidden=32"):
        preflight(demo_cfg(tmp_path, *base, "encoder.model=tiny:qwen2:hidden=32"))
    with pytest.raises(PreflightError, match=r"shards were tokenized with .*data.tokenizer is 'asset:gpt2-tokenizer'"):
        preflight(demo_cfg(tmp_path, *base, "data.tokenizer=asset:gpt2-tokenizer"))
    proc = run_module("coupling_dist.stage_a", "--config", DEMO, f"run.dir={tmp_path}", *base,
                      "encoder.model=tiny:qwen2:hidden=32", "run.wandb.mode=disabled", check=False, timeout=300)
    assert proc.returncode == 2 and "rerun preprocess" in proc.stderr and "manifest.json" in proc.stderr
    assert not (tmp_path / "stage_a" / "checkpoints").exists()
