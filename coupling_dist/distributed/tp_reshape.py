"""Resuming a checkpoint at another tensor-parallel (model-parallel) size.

The route is DeepSpeed's universal checkpoint, the same one that already handles a change of
data-parallel size: ``ds_to_universal`` merges every parameter's fp32 master weight and Adam
moments (``exp_avg``, ``exp_avg_sq``) over the ZeRO shards *and* over the TP slices into one full
tensor per parameter, and ``load_universal`` cuts each rank's slice again for the new layout. It
needs to be told how the TP slices were cut, which is what this module produces from the task's
``tp_partition_dims()`` ({parameter name: split dim}):

- ``universal_info``: the ``universal_checkpoint_info`` DeepSpeed stores in every
  ``mp_rank_XX_model_states.pt`` when it is set on the engine's module. Split along dim 1 (row
  parallel) -> ``parameter_with_row_parallelism_patterns`` (merged with ``cat(dim=1)``, re-cut on
  dim 1); split along dim 0 (column parallel, vocab-parallel head/embedding) -> DeepSpeed's default
  ``cat(dim=0)``; not split (replicated on every TP rank: norms, row-parallel biases, input
  projections) -> ``parameter_to_average_patterns`` (the TP copies are equal, so their mean is the
  value, exactly for TP sizes that are powers of two; averaging never fails where a bitwise
  equality check could on reduction-order noise). One anchored pattern per parameter name.
- ``layout_meta``: ``tp_layout.json`` written into each checkpoint: the TP size, and per parameter
  its split dim and *full* (TP = 1) shape, so a resume can refuse a model whose full shapes differ
  (e.g. a vocabulary padded to a multiple of 128 x TP) before DeepSpeed fails on an element count.
- ``reshard_ema``: the EMA shards are our own files (full tensors of one TP slice, by name); they
  are concatenated over the saved TP ranks and cut again for this rank.

DeepSpeed's loader restores the module weights from the fp32 masters, the scheduler and its own
counters from the model-states file of the matching source rank, and our trainer state (step, data
position) comes from rank 0's file, so step, scheduler, data position, optimizer state and EMA all
continue. Per-rank RNG streams do not map across layouts and are reseeded (as for a DP change).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional

import torch

from .tensor_parallel import shard_slice

TP_LAYOUT = "tp_layout.json"
RESHAPE_ZERO_STAGES = (1, 2)  # ds_to_universal + load_universal with TP slices: ZeRO 1/2 optimizers


def _shape(p: torch.Tensor) -> list[int]:
    return list(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 partitions p.data; ds_shape is the real one


def layout_meta(model: torch.nn.Module, dims: dict[str, int], mp_world: int) -> dict:
    """{"mp_world", "params": {name: {"dim": split dim or None, "shape": full TP = 1 shape}}} for
    the trainable parameters of ``model`` (this rank's TP slices; ``dims`` names the split ones)."""
    params = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape, dim = _shape(p), dims.get(name)
        if dim is not None:
            if dim not in (0, 1):
                raise ValueError(f"tensor-parallel split of '{name}' along dim {dim}: only dims 0 and 1 can be "
                                 f"resharded")
            shape[dim] *= mp_world
        params[name] = {"dim": dim, "shape": shape}
    unknown = sorted(set(dims) - set(params))
    if unknown:
        raise KeyError(f"tp_partition_dims names tensors that are not trainable parameters: {unknown[:5]}")
    return {"mp_world": int(mp_world), "params": params}


def universal_info(meta: dict, ds_names: dict[str, str]) -> dict:
    """DeepSpeed ``universal_checkpoint_info`` for ``meta`` (``layout_meta``); ``ds_names`` maps a
    model parameter name to the name DeepSpeed knows it by (the engine's module prefixes it)."""
    from deepspeed.checkpoint.constants import (PARAMETER_TO_AVERAGE_PATTERNS, PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    row, replicated = [], []
    for name, info in meta["params"].items():
        pattern = "^" + re.escape(ds_names[name]) + "$"
        if info["dim"] is None:
            replicated.append(pattern)
        elif info["dim"] == 1:
            row.append(pattern)
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row, PARAMETER_TO_AVERAGE_PATTERNS: replicated}


def read_layout(ckpt: str) -> Optional[dict]:
    path = os.path.join(ckpt, TP_LAYOUT)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def reshape_error(ckpt: str, marker: dict, layout: dict) -> Optional[str]:
    """Why ``ckpt`` (saved at another model-parallel size) cannot be resumed under ``layout``, or None."""
    saved, now = marker.get("mp_world", 1), layout["mp_world"]
    head = f"{ckpt}: saved with model-parallel (TP) size {saved} but this run uses {now}"
    if read_layout(ckpt) is None:
        return (f"{head}, and it has no {TP_LAYOUT} (written before TP resharding existed, or by a task without "
                f"tp_partition_dims): resume it with TP {saved}")
    for what, zero in (("was saved", marker.get("zero_stage")), ("this run uses", layout["zero_stage"])):
        if zero not in RESHAPE_ZERO_STAGES:
            return (f"{head}; changing the TP size needs ZeRO stage 1 or 2 on both sides (DeepSpeed's universal "
                    f"checkpoint) but it {what} zero_stage {zero}: resume at TP {saved} with the saved ZeRO stage, "
                    f"or set train.zero_stage to 1 or 2")
    return None


def check_shapes(ckpt: str, saved: dict, current: dict) -> None:
    """The full (TP = 1) parameter shapes must not depend on the TP size."""
    a, b = saved["params"], current["params"]
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise ValueError(f"{ckpt}: parameters differ from this run's model (only in the checkpoint: {missing[:5]}, "
                         f"only in the model: {extra[:5]})")
    for name in a:
        if list(a[name]["shape"]) != list(b[name]["shape"]) or a[name]["dim"] != b[name]["dim"]:
            raise ValueError(
                f"{ckpt}: parameter '{name}' is {a[name]['shape']} (split dim {a[name]['dim']}) at TP "
                f"{saved['mp_world']} but {b[name]['shape']} (split dim {b[name]['dim']}) at TP "
                f"{current['mp_world']}: its full shape depends on the TP size (e.g. a vocabulary padded to a "
                f"multiple of 128 x TP when Stage B has no KD teacher), so this checkpoint cannot be resharded; "
                f"resume it at TP {saved['mp_world']}")


def reshard_ema(files: Iterable[str], saved: dict, mp_rank: int, mp_world: int, wanted: Optional[set] = None,
                load=None) -> list[dict]:
    """EMA shards (``ema_rank*.pt`` of a checkpoint saved at TP ``saved['mp_world']``) re-cut for TP
    rank ``mp_rank`` of ``mp_world``; one merged shard holding the names in ``wanted`` (all if None)."""
    src = int(saved["mp_world"])
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    num_updates, decay = 0, None
    for f in files:
        shard = load(f)
        r = int(shard.get("mp_rank", 0))
        num_updates, decay = int(shard["num_updates"]), shard.get("decay")
        for name, t in shard["shadow"].items():
            if wanted is None or name in wanted:
                pieces.setdefault(name, {})[r] = t
    out = {}
    for name, parts in pieces.items():
        info = saved["params"].get(name)
        if info is None:
            raise KeyError(f"EMA tensor '{name}' is not in the checkpoint's {TP_LAYOUT}")
        dim = info["dim"]
        if dim is None:
            out[name] = parts[min(parts)]
            continue
        lost = [r for r in range(src) if r not in parts]
        if lost:
            raise KeyError(f"EMA tensor '{name}': no shard of TP rank(s) {lost} in the checkpoint")
        full = torch.cat([parts[r] for r in range(src)], dim) if src > 1 else parts[0]
        out[name] = full if mp_world == 1 else shard_slice(full, dim, mp_rank, mp_world)
    return [{"shadow": out, "num_updates": num_updates, "decay": decay}]
