"""Config errors fail before any work and name the key (and the file)."""
from __future__ import annotations

import pytest

from conftest import DEMO, run_module
from coupling_dist.config import ConfigError, load_config


def test_valid_demo_and_overrides():
    cfg = load_config(DEMO, ["data.seq_len=64", "data.corpus=[a.txt, 'b/*.jsonl']", "ray.address=127.0.0.1:6379"])
    assert cfg.data.seq_len == 64 and cfg.data.corpus == ["a.txt", "b/*.jsonl"] and cfg.ray.address == "127.0.0.1:6379"
    assert cfg.data_dir.endswith("data") and cfg.data.verify_existing == "sha256"


@pytest.mark.parametrize("override, pattern", [
    ("data.seq_lenn=3", r"tiny\.yaml.*unknown key 'data\.seq_lenn'"),
    ("encoder.nope.x=1", r"unknown key 'encoder\.nope'"),
    ("data.seq_len=abc", r"'data\.seq_len' = 'abc' has the wrong type \(expected int\)"),
    ("data.shard_size=0", r"'data\.shard_size' = 0 must be > 0"),
    ("data.heldout_fraction=1.5", r"'data\.heldout_fraction' = 1\.5 must be < 1"),
    ("encoder.dtype=int8", r"'encoder\.dtype' = 'int8' must be one of"),
    ("loader.skip_bad=maybe", r"'loader\.skip_bad' = 'maybe' has the wrong type \(expected bool\)"),
    ("data.verify_existing=md5", r"'data\.verify_existing' = 'md5' must be one of"),
    ("ray.num_workers=-1", r"'ray\.num_workers' = -1 must be > 0"),
    ("data.seq_len", r"override 'data\.seq_len' must look like dotted\.key=value"),
    ("data..x=1", r"override 'data\.\.x=1' has an empty key part"),
    ("data.seq_len.x=1", r"'seq_len' is not a section"),
    ("stage_a.flow.conditioner=conv", r"'stage_a\.flow\.conditioner' = 'conv' must be one of"),
])
def test_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEMO, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  seq_len: 16\n  tokenizr: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'data\.tokenizr'"):
        load_config(str(p))
    p.write_text("data: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'data' must be a mapping"):
        load_config(str(p))


def test_entry_exits_2_before_any_work(tmp_path):
    proc = run_module("coupling_dist.preprocess", "--config", DEMO, f"run.dir={tmp_path}", "data.seq_len=1",
                      check=False, timeout=120)
    assert proc.returncode == 2 and "'data.seq_len' = 1 must be > 1" in proc.stderr
    assert not (tmp_path / "data").exists()
    proc = run_module("coupling_dist.preprocess", "--config", DEMO, f"run.dir={tmp_path}",
                      "data.corpus=/nonexistent/*.txt", "run.progress=false", check=False, timeout=120)
    assert proc.returncode == 2 and "'data.corpus'" in proc.stderr and "no file matches" in proc.stderr


def test_a_section_keeps_its_own_defaults_for_the_keys_a_file_leaves_out(tmp_path):
    """stage_b.train's defaults are not TrainConfig's (lr 2e-4, EMA 0.999): setting one of its keys in a
    file or an override must not silently reset the others to TrainConfig's (it did until 2026-11)."""
    t = load_config(None, ["stage_b.train.steps=50"]).stage_b.train
    assert (t.steps, t.lr, t.ema_decay) == (50, 2e-4, 0.999)
    p = tmp_path / "c.yaml"
    p.write_text("stage_b:\n  train:\n    steps: 40\n    ema_decay: null\n", encoding="utf-8")
    t = load_config(str(p)).stage_b.train
    assert (t.steps, t.lr, t.ema_decay) == (40, 2e-4, None)
    t = load_config(None, ["finetune.train.steps=6", "finetune.train.lr=1e-3"]).finetune.train
    assert (t.steps, t.lr, t.warmup_steps, t.weight_decay, t.betas, t.schedule) == (6, 1e-3, 0, 0.0, [0.9, 0.95], "constant")


def test_mlp_flow_conditioner_derives_its_positions_and_refuses_a_mismatch():
    """stage_a.flow.conditioner: mlp is built for data.seq_len / stage_a.patch positions: derived when
    left out, and a stated value that disagrees (or a TarFlow) is refused naming the keys."""
    cfg = load_config(DEMO, ["stage_a.flow.conditioner=mlp"])
    assert cfg.stage_a.flow.positions == cfg.data.seq_len
    cfg = load_config(DEMO, ["stage_a.flow.conditioner=mlp", "data.seq_len=32", "stage_a.patch=4"])
    assert cfg.stage_a.flow.positions == 8
    assert load_config(DEMO).stage_a.flow.positions is None  # the transformer conditioner has any length
    with pytest.raises(ConfigError, match=r"'stage_a\.flow\.positions' \(5\) must be 'data\.seq_len' / 'stage_a\.patch'"):
        load_config(DEMO, ["stage_a.flow.conditioner=mlp", "stage_a.flow.positions=5"])
    with pytest.raises(ConfigError, match=r"conditioner: mlp' is a RealNVP conditioner; 'stage_a\.flow\.kind' is 'tarflow'"):
        load_config(DEMO, ["stage_a.flow.conditioner=mlp", "stage_a.flow.kind=tarflow"])
