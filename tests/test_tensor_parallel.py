"""TP = 2 vs TP = 1 from the same initial weights (real ranks, megatron-core layers, fp32)."""
from __future__ import annotations

import json
import os

import pytest

from conftest import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    torchrun(2, [os.path.join(HERE, "stage_b_worker.py"), "tp", str(out)], timeout=300)
    res = []
    for r in range(2):
        with open(out / f"rank{r}.json") as fh:
            res.append(json.load(fh))
    return res


@pytest.mark.parametrize("kind", ["onestep", "masked", "masked_conditional", "onestep_patch_conditional"])
def test_tp2_matches_tp1(tp2, kind):
    """masked_conditional: a class-conditional denoiser fed labels (its replicated class embedding
    gets the same gradient on both TP ranks); onestep_patch_conditional: 2 tokens per latent position
    (the replicated ``unpatch`` layer, as MNIST's 16 and DNA's 20) with classes."""
    for r, res in enumerate(tp2):
        c = res[kind]
        # the layers really are sharded megatron-core layers
        assert c["head_class"] == "ColumnParallelLinear" and c["local_head_rows"] == 48 and c["local_q_out"] == 16
        assert c["kd_value"] > 0.1
        for k in ("logits", "loss", "ce", "kd", "grad", "weights"):
            assert c[k] < 1e-5, (r, kind, k, c)
        assert c["grad_names"] == [] and c["weight_names"] == []


def test_tp_layout_errors():
    from coupling_dist.distributed.parallel_state import ParallelLayoutError, check_layout

    assert check_layout(2, 4) == 2
    with pytest.raises(ParallelLayoutError, match="stage_b.tp"):
        check_layout(3, 4)


def test_megatron_rng_tracker_on_cpu(tp2):
    """model_parallel_cuda_manual_seed + tracker.fork() work through the CPU shim: per-TP-rank
    streams, and the default stream is left as it was."""
    import torch

    for res in tp2:
        assert res["rng"]["shim"] == (not torch.cuda.is_available())
        assert res["rng"]["outer_rng_untouched"] and res["rng"]["tp_ranks_differ"]
