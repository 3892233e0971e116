"""Resuming at another tensor-parallel size (components/tp_reshape.py): the split metadata, the EMA
re-cut, the refusals, and a real Stage B chain TP 2 (2 ranks) -> TP 1 (1 rank) -> TP 2 (2 ranks)
against an uninterrupted TP 2 run (DeepSpeed universal checkpoints, real gloo ranks)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import pytest
import torch

from conftest import ROOT, run_module, torchrun
from stage_b_fixtures import make_pair_store

from coupling_dist.components.atomic import write_text as write_text_atomic
from coupling_dist.components.checkpoint import CheckpointManager
from coupling_dist.distributed.tp_reshape import (TP_LAYOUT, check_shapes, layout_meta, reshard_ema,
                                                 universal_info)
from coupling_dist.config import GeneratorConfig
from coupling_dist.models.generator import Generator, load_generator


def _gen(kind="masked"):
    torch.manual_seed(0)
    return Generator(GeneratorConfig(kind=kind, width=32, depth=1, heads=4, ffn=64), 8, 10, 96,
                     mask_token_id=95 if kind == "masked" else None)


# --------------------------------------------------------------------------- metadata


def test_partition_dims_and_universal_info():
    from deepspeed.checkpoint.constants import PARAMETER_TO_AVERAGE_PATTERNS, PARAMETER_WITH_ROW_PARALLELISM_PATTERNS

    from coupling_dist.distributed.tensor_parallel import partition_dims

    g = _gen()
    dims = partition_dims(g)
    leaves = {n.rsplit(".", 2)[-2]: d for n, d in dims.items()}
    assert leaves == {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 0, "up": 0, "down": 1, "head": 0, "tok_emb": 0}
    meta = layout_meta(g, dims, mp_world=2)  # as if these were TP = 2 slices: full shapes double on the split dim
    p = meta["params"]
    assert p["head.weight"] == {"dim": 0, "shape": [192, 32]}
    o = next(n for n in p if n.endswith("attn.o.weight"))
    assert p[o]["shape"] == [32, 64] and p[o]["dim"] == 1
    replicated = [n for n, i in p.items() if i["dim"] is None]
    assert replicated and all(p[n]["shape"] == list(dict(g.named_parameters())[n].shape) for n in replicated)
    info = universal_info(meta, {n: "model." + n for n in p})
    rows, avg = info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS], info[PARAMETER_TO_AVERAGE_PATTERNS]
    for n, i in p.items():  # row-split -> row patterns, replicated -> averaged, dim 0 -> DeepSpeed's default cat
        want = {1: ([n], []), None: ([], [n]), 0: ([], [])}[i["dim"]]
        got = ([q for q in rows if re.match(q, "model." + n)], [q for q in avg if re.match(q, "model." + n)])
        assert got == tuple([f"^{re.escape('model.' + x)}$" for x in w] for w in want), n
    with pytest.raises(KeyError, match="not trainable parameters"):
        layout_meta(g, {"nope.weight": 0}, 2)


def test_check_shapes_refuses_tp_dependent_vocabulary():
    g1, g2 = _gen("onestep"), Generator(GeneratorConfig(kind="onestep", width=32, depth=1, heads=4, ffn=64), 8, 10, 128)
    from coupling_dist.distributed.tensor_parallel import partition_dims

    a, b = layout_meta(g1, partition_dims(g1), 1), layout_meta(g2, partition_dims(g2), 1)
    check_shapes("ck", a, dict(a, mp_world=2))
    b["mp_world"] = 2  # the same model, but its vocabulary padded for TP 2
    with pytest.raises(ValueError, match=r"'head.weight' is \[96, 32\].*\[128, 32\].*vocabulary padded.*at TP 1"):
        check_shapes("ck", a, b)


def test_reshard_ema_between_tp_sizes(tmp_path):
    g = _gen()
    from coupling_dist.distributed.tensor_parallel import partition_dims

    dims = partition_dims(g)
    full = {n: torch.randn(p.shape) for n, p in g.named_parameters()}
    names = list(full)
    # TP = 2 x DP = 2 save: mp rank r holds its slices; DP owner = parameter index % 2
    files, meta = [], layout_meta(g, dims, 1)
    for mp in range(2):
        for dp in range(2):
            shadow = {}
            for i, n in enumerate(names):
                if i % 2 == dp:
                    d = dims.get(n)
                    shadow[n] = full[n] if d is None else full[n].chunk(2, d)[mp].clone()
            path = tmp_path / f"ema_rank{mp * 2 + dp}.pt"
            torch.save({"decay": 0.9, "num_updates": 7, "shadow": shadow, "mp_rank": mp}, path)
            files.append(str(path))
    saved = dict(meta, mp_world=2)
    load = lambda f: torch.load(f, weights_only=True)  # noqa: E731
    [one] = reshard_ema(files, saved, 0, 1, None, load)
    assert one["num_updates"] == 7 and set(one["shadow"]) == set(names)
    assert all(torch.equal(one["shadow"][n], full[n]) for n in names)
    # TP = 1 -> 4 (only the wanted names are kept)
    tp1 = tmp_path / "tp1"
    tp1.mkdir()
    torch.save({"decay": 0.9, "num_updates": 7, "shadow": full, "mp_rank": 0}, tp1 / "ema_rank0.pt")
    wanted = set(names[::2])
    [r3] = reshard_ema([str(tp1 / "ema_rank0.pt")], meta, 3, 4, wanted, load)
    assert set(r3["shadow"]) == wanted
    for n in wanted:
        d = dims.get(n)
        assert torch.equal(r3["shadow"][n], full[n] if d is None else full[n].chunk(4, d)[3])
    with pytest.raises(KeyError, match=r"no shard of TP rank\(s\) \[1\]"):
        reshard_ema([f for f in files if "rank2" not in f and "rank3" not in f], saved, 0, 1, None, load)


def _fake_checkpoint(root, step: int, marker: dict, tp_meta=None) -> str:
    path = os.path.join(root, "checkpoints", f"step_{step:08d}")
    os.makedirs(path)
    write_text_atomic(os.path.join(path, "complete.json"), json.dumps({"step": step, **marker}))
    if tp_meta is not None:
        write_text_atomic(os.path.join(path, TP_LAYOUT), json.dumps(tp_meta))
    return path


def test_plan_resume_across_tp_sizes(tmp_path):
    layout = {"world": 1, "dp_world": 1, "mp_world": 1, "zero_stage": 2}
    saved = {"world": 2, "dp_world": 1, "mp_world": 2, "zero_stage": 2}
    m = CheckpointManager(str(tmp_path / "old"))
    _fake_checkpoint(str(tmp_path / "old"), 4, saved)
    with pytest.raises(ValueError, match=r"TP\) size 2 but this run uses 1, and it has no tp_layout.json.*TP 2"):
        m.plan_resume("auto", layout)
    m = CheckpointManager(str(tmp_path / "z0"))
    _fake_checkpoint(str(tmp_path / "z0"), 4, dict(saved, zero_stage=0), {"mp_world": 2, "params": {}})
    with pytest.raises(ValueError, match="ZeRO stage 1 or 2 .* zero_stage 0"):
        m.plan_resume("auto", layout)
    m = CheckpointManager(str(tmp_path / "ok"))
    path = _fake_checkpoint(str(tmp_path / "ok"), 4, saved, {"mp_world": 2, "params": {}})
    plan = m.plan_resume("auto", layout)
    assert plan["path"] == path and plan["universal"] and plan["mp_changed"] and plan["step"] == 4
    same = m.plan_resume("auto", dict(layout, world=2, mp_world=2))
    assert not same["universal"] and not same["mp_changed"]


# --------------------------------------------------------------------------- real Stage B runs

ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "run.progress=false", "run.wandb.mode=disabled",
        "run.log_interval=1", "stage_b.train.warmup_steps=1", "stage_b.train.lr=1e-3",
        "stage_b.train.min_lr_ratio=0.1", "stage_b.train.eval_interval=1000", "stage_b.kd.chunk_vocab=151936",
        "stage_b.train.steps=4", "stage_b.train.batch_size=4", "stage_b.train.ckpt_interval=1",
        "stage_b.train.keep_last=4", "stage_b.train.peak_flops=1e12", "stage_b.train.zero_stage=2",
        "stage_b.train.ema_decay=0.99"]


def _stage_b(nproc: int, run: str, tp: int, *extra: str) -> None:
    args = [*ARGS, f"run.dir={run}", f"stage_b.tp={tp}", *extra]
    if nproc == 1:
        run_module("coupling_dist.stage_b", *args, timeout=900)
    else:
        torchrun(nproc, ["-m", "coupling_dist.stage_b", *args], timeout=900)


def _ckpt(run: str, step: int) -> str:
    return os.path.join(run, "stage_b", "checkpoints", f"step_{step:08d}")


def _live_weights(ckpt: str) -> dict:
    """Full (TP = 1) live parameters of a checkpoint: the DeepSpeed module of every TP rank, joined."""
    with open(os.path.join(ckpt, TP_LAYOUT)) as fh:
        meta = json.load(fh)
    n = meta["mp_world"]
    mods = [torch.load(os.path.join(ckpt, f"mp_rank_{r:02d}_model_states.pt"), weights_only=True)["module"]
            for r in range(n)]
    out = {}
    for name, info in meta["params"].items():
        parts = [m["model." + name] for m in mods]
        out[name] = parts[0] if info["dim"] is None or n == 1 else torch.cat(parts, info["dim"])
        assert list(out[name].shape) == info["shape"], name
    return out


def _rows(run: str) -> dict:
    with open(os.path.join(run, "stage_b", "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh) if "loss" in r}


def _digest(path: str) -> dict:
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(glob.glob(os.path.join(path, "*")))}


def _maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_stage_b_resumes_across_tp_sizes(tmp_path):
    make_pair_store(str(tmp_path / "store"), n_train=64, n_heldout=8)
    runs = {}
    for name in ("ref", "tp1", "tp2"):
        os.makedirs(tmp_path / name)
        os.symlink(tmp_path / "store" / "pair_store", tmp_path / name / "pair_store")
        runs[name] = str(tmp_path / name)
    ref, x1, x2 = runs["ref"], runs["tp1"], runs["tp2"]
    _stage_b(2, ref, 2)  # uninterrupted TP = 2, checkpoints at every step
    src = _ckpt(ref, 2)
    before = _digest(src)
    _stage_b(1, x1, 1, f"stage_b.train.resume={src}")  # TP 2 -> 1 at step 2
    assert _digest(src) == before  # the source checkpoint is never written to
    _stage_b(2, x2, 2, f"stage_b.train.resume={_ckpt(x1, 3)}")  # TP 1 -> 2 at step 3

    assert "TP 2 -> 1" in open(os.path.join(x1, "stage_b", "log.rank0.txt")).read()
    assert "TP 1 -> 2" in open(os.path.join(x2, "stage_b", "log.rank0.txt")).read()
    assert json.load(open(os.path.join(_ckpt(x1, 4), "complete.json")))["mp_world"] == 1
    assert json.load(open(os.path.join(_ckpt(x2, 4), "complete.json")))["mp_world"] == 2
    assert not glob.glob(os.path.join(x1, "stage_b", "checkpoints", ".universal", "*.tmp"))

    # live fp32 weights after the resumed steps (optimizer moments, step and LR schedule carried over:
    # a reset Adam would move every weight by ~lr = 1e-3 on its first step)
    w_ref = _live_weights(_ckpt(ref, 4))
    for ckpt_ref, ckpt in ((_ckpt(ref, 3), _ckpt(x1, 3)), (_ckpt(ref, 4), _ckpt(x1, 4)), (_ckpt(ref, 4), _ckpt(x2, 4))):
        assert _maxdiff(_live_weights(ckpt_ref), _live_weights(ckpt)) < 1e-5, ckpt
    assert _maxdiff(w_ref, _live_weights(_ckpt(ref, 2))) > 1e-4  # the steps really moved the weights
    # EMA: the exported generators (EMA, gathered to TP = 1)
    e_ref = load_generator(os.path.join(ref, "stage_b", "export"))[0].state_dict()
    for run in (x1, x2):
        assert _maxdiff(e_ref, load_generator(os.path.join(run, "stage_b", "export"))[0].state_dict()) < 1e-5, run
    # logged losses / LR / data position of the steps after each resume
    r_ref = _rows(ref)
    for run, steps in ((x1, [3, 4]), (x2, [4])):
        rows = _rows(run)
        assert sorted(rows) == steps, run
        for s in steps:
            assert rows[s]["loss"] == pytest.approx(r_ref[s]["loss"], rel=1e-5), (run, s)
            assert rows[s]["lr"] == pytest.approx(r_ref[s]["lr"], rel=1e-6) and rows[s]["data_step"] == s
