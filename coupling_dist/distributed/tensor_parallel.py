"""Apply megatron-core tensor parallelism to a plain model from outside, and undo it for export.

``apply_tensor_parallel(model, tp_group)`` swaps, in place, by the module-name contract of
``models/layers.py`` / ``models/generator.py``:

- ``q k v gate up fc_in`` (``nn.Linear``) -> ``ColumnParallelLinear`` (output features split);
- ``o down fc_out``                       -> ``RowParallelLinear(input_is_parallel=True)`` (input
  features split, partial outputs all-reduced in the TP group, bias replicated);
- ``head``  (the output head)             -> vocab-parallel ``ColumnParallelLinear(gather_output=False)``:
  each TP rank holds the rows of its contiguous vocabulary range and produces only those logits
  (the loss is computed vocab-parallel, ``losses.kd_loss``; the vocabulary is never gathered);
- ``tok_emb`` (``nn.Embedding``, masked kind) -> ``VocabParallelEmbedding`` (same vocabulary split).

Each new layer receives *this rank's shard of the existing full weights*, so a model built with the
same seed starts at TP = N exactly where it would at TP = 1 (tests compare logits, loss and
gradients to 1e-5). Everything else (``in_proj``, ``pos_emb``, norms) stays replicated; their
gradients are identical on every TP rank because the parallel layers all-reduce the input gradients.

``partition_dims(model)`` names the split tensors and their dims for a plain or a TP model alike
(saved with checkpoints so a run resumes at another TP size: ``distributed/tp_reshape.py``).
``gather_full_state_dict(model[, state_dict])`` reassembles TP = 1 tensors (collective in the TP
group) for export, for EMA weights, and for restarting at another TP size via
``shard_state_dict(full, model)``. megatron-core is imported lazily: only the training path uses
this module.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

COLUMN = ("q", "k", "v", "gate", "up", "fc_in")
ROW = ("o", "down", "fc_out")
HEAD, EMBED = "head", "tok_emb"
# which tensors of each kind of layer are split across the TP group, along which dim
DIMS = {"column": {"weight": 0, "bias": 0}, "head": {"weight": 0, "bias": 0}, "row": {"weight": 1},
        "embed": {"weight": 0}}
_CLASSES: dict = {}


def _classes():
    """megatron layers that return a tensor (megatron's return ``(output, bias)``); built once."""
    if not _CLASSES:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

        # megatron's get_extra_state() returns None only "for TE compatibility", which puts a None
        # '<layer>._extra_state' entry into every saved state dict; DeepSpeed's universal converter
        # (resume at another TP size) fails on it. Not saving it is safe: megatron's load pre-hook
        # supplies the key, so checkpoints with or without it load strictly.
        class TPColumnLinear(ColumnParallelLinear):
            get_extra_state = nn.Module.get_extra_state

            def forward(self, x):  # bias (if any) is added inside: skip_bias_add=False
                return super().forward(x)[0]

        class TPRowLinear(RowParallelLinear):
            get_extra_state = nn.Module.get_extra_state

            def forward(self, x):
                return super().forward(x)[0]

        _CLASSES.update(column=TPColumnLinear, row=TPRowLinear, embed=VocabParallelEmbedding)
    return _CLASSES


def _mp_config(tp: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    # perform_initialization=False: weights are copied from the plain model right after.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype, deterministic_mode=True)


def _no_init(_w):
    return None


def shard_slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/``size`` of ``t`` along ``dim`` (a copy): how every TP split is cut."""
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"dimension {dim} of size {n} is not divisible by the TP size {size}")
    return t.narrow(dim, rank * (n // size), n // size).clone()


def _kind(name: str, module: nn.Module) -> Optional[str]:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Linear):
        if leaf in COLUMN:
            return "column"
        if leaf in ROW:
            return "row"
        if name == HEAD:
            return "head"
    if isinstance(module, nn.Embedding) and name == EMBED:
        return "embed"
    return None


def apply_tensor_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Swap the plain layers of ``model`` for megatron-core TP layers holding this rank's shards."""
    size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if getattr(model, "_tp_size", 1) != 1:
        raise RuntimeError("apply_tensor_parallel: model is already tensor-parallel")
    cls = _classes()
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes as set_tp_attrs

    targets = [(n, m, _kind(n, m)) for n, m in model.named_modules()]
    targets = [(n, m, k) for n, m, k in targets if k is not None]
    if not any(k == "head" for _, _, k in targets):
        raise ValueError("apply_tensor_parallel: model has no top-level 'head' linear")
    for name, old, kind in targets:
        dtype = old.weight.dtype
        config = _mp_config(size, dtype)
        with torch.no_grad():
            if kind in ("column", "head"):
                new = cls["column"](old.in_features, old.out_features, config=config, init_method=_no_init,
                                    bias=old.bias is not None, gather_output=False, skip_bias_add=False,
                                    tp_group=tp_group)
                new.weight.copy_(shard_slice(old.weight, 0, rank, size))
                if old.bias is not None:
                    new.bias.copy_(shard_slice(old.bias, 0, rank, size))
            elif kind == "row":
                new = cls["row"](old.in_features, old.out_features, config=config, init_method=_no_init,
                                 bias=old.bias is not None, input_is_parallel=True, skip_bias_add=False,
                                 tp_group=tp_group)
                new.weight.copy_(shard_slice(old.weight, 1, rank, size))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            else:
                new = cls["embed"](old.num_embeddings, old.embedding_dim, init_method=_no_init, config=config,
                                   tp_group=tp_group)
                new.weight.copy_(shard_slice(old.weight, 0, rank, size))
        dims = dict(DIMS[kind])
        new.to(old.weight.device)
        new.train(old.training)
        # perform_initialization=False skips megatron's tagging of sharded tensors; DeepSpeed's
        # gradient-norm (clipping) reads these tags to count each shard once per TP group.
        for pname, dim in dims.items():
            t = getattr(new, pname, None)
            if t is not None and not getattr(t, "tensor_model_parallel", False):
                set_tp_attrs(t, True, dim, 1)
        new._cd_partition_dims = dims  # which of its tensors are split, along which dim
        if kind == "head":
            new.vocab_start = rank * (old.out_features // size)
            new.vocab_size = old.out_features
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    model._tp_size, model._tp_rank, model._tp_group = size, rank, tp_group
    return model


def tp_info(model: nn.Module) -> tuple[int, int, object]:
    """(size, rank, group) of a model (1, 0, None when plain)."""
    return getattr(model, "_tp_size", 1), getattr(model, "_tp_rank", 0), getattr(model, "_tp_group", None)


def head_shard(model: nn.Module) -> tuple[torch.Tensor, int, int]:
    """(this rank's head weight [V_local, width], its first vocabulary id, the full vocabulary size)."""
    head = model.head
    w = head.weight
    return w, int(getattr(head, "vocab_start", 0)), int(getattr(head, "vocab_size", w.shape[0]))


def tp_layout(model: nn.Module) -> dict[str, int]:
    """{state-dict name: split dim} for every tensor that is sharded across the TP group."""
    out = {}
    for mname, m in model.named_modules():
        for pname, dim in (getattr(m, "_cd_partition_dims", None) or {}).items():
            if getattr(m, pname, None) is not None:
                out[f"{mname}.{pname}" if mname else pname] = dim
    return out


def partition_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name: split dim} of the tensors that are (or, for a plain model, would be) split
    across a TP group: the same for every TP size, which is what lets a checkpoint be resharded."""
    if getattr(model, "_tp_size", 1) != 1:
        return tp_layout(model)
    out = {}
    for mname, m in model.named_modules():
        kind = _kind(mname, m)
        for pname, dim in (DIMS[kind] if kind else {}).items():
            if getattr(m, pname, None) is not None:
                out[f"{mname}.{pname}" if mname else pname] = dim
    return out


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def gather_full_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict:
    """TP = 1 state dict (fp32-preserving, CPU) from this rank's shards; ``state_dict`` (e.g. the EMA
    shards, same names) defaults to the model's own. Collective over the model's TP group: every
    rank of the group must call it with the same keys."""
    size, _, group = tp_info(model)
    sd = state_dict if state_dict is not None else model.state_dict()
    layout = tp_layout(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("_extra_state") or not torch.is_tensor(t):
            continue
        t = t.detach()
        dim = layout.get(name)
        if size == 1 or dim is None:
            out[name] = t.cpu().clone()
            continue
        dev = _comm_device(group)
        local = t.to(dev).contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        out[name] = torch.cat(parts, dim).cpu()
    return out


def shard_state_dict(full: dict, model: nn.Module) -> dict:
    """This rank's shards of a TP = 1 state dict ``full`` for the TP model ``model`` (the inverse of
    ``gather_full_state_dict``; used to start a run at a new TP size from TP = 1 weights)."""
    size, rank, _ = tp_info(model)
    layout = tp_layout(model)
    own = model.state_dict()
    out = {}
    for name, t in own.items():
        if name.endswith("_extra_state"):
            continue
        if name not in full:
            raise KeyError(f"full state dict lacks '{name}'")
        dim = layout.get(name)
        out[name] = full[name] if (size == 1 or dim is None) else shard_slice(full[name], dim, rank, size)
    return out
