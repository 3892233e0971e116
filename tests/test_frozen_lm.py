"""The real SmolLM2-135M (one GGUF file, ``asset:smollm2-135m-gguf``) wherever a frozen LM is used:
the shared loader (``components.assets``), the preprocess encoder run only up to its layer
(``models.frozen_encoder``), the tokenizer, and the Stage B teacher preflight. The GGUF is
de-quantized once per module (~25 s on CPU)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import demo_cfg  # noqa: E402
from stage_b_fixtures import make_pair_store  # noqa: E402

from coupling_dist.components import assets  # noqa: E402
from coupling_dist.components.preflight import PreflightError  # noqa: E402
from coupling_dist.models.frozen_encoder import FrozenEncoder, load_encoder  # noqa: E402

SMOL = "asset:smollm2-135m-gguf"
TEXTS = ["The cat sat on the mat.", "Stocks fell sharply in Sydney on Tuesday after the bank's report."]


@pytest.fixture(scope="module")
def smollm():
    return assets.load_causal_lm(SMOL)


@pytest.fixture(scope="module")
def smol_tok():
    return assets.load_tokenizer(SMOL)


def _batch(tok, T=16):
    rows = [tok(t, add_special_tokens=False)["input_ids"][:T - 1] + [tok.eos_token_id] for t in TEXTS]
    return torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])


def _full_hidden(model, ids, k):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[k]


def test_smollm_loads_as_a_frozen_lm(smollm):
    conf = assets.load_config(SMOL)
    assert (conf.model_type, conf.hidden_size, conf.num_hidden_layers, conf.vocab_size) == ("llama", 576, 30, 49152)
    assert not smollm.training and not any(p.requires_grad for p in smollm.parameters())
    assert smollm.get_input_embeddings().weight.shape == (49152, 576)


def test_smollm_tokenizer_and_identity(smol_tok):
    ident = assets.tokenizer_identity(SMOL)
    assert ident["vocab_size"] == 49152 and ident["eos_id"] == 2 and ident["pad_id"] == 2  # <|im_end|>
    assert ident["hash"] == assets.tokenizer_identity(assets.resolve(SMOL))["hash"]  # ref or path: same vocab
    assert ident["hash"] != assets.tokenizer_identity("asset:qwen2.5-tokenizer")["hash"]
    # The tokenizer extracted into the cache encodes exactly as the one parsed from the GGUF itself.
    from transformers import AutoTokenizer

    d, f = assets.gguf_split(assets.resolve(SMOL))
    direct = AutoTokenizer.from_pretrained(d, gguf_file=f)
    for t in TEXTS + ["  spaces\tand\nnewlines, ünïcödé 123"]:
        assert smol_tok(t, add_special_tokens=False)["input_ids"] == direct(t, add_special_tokens=False)["input_ids"]
        assert smol_tok.decode(smol_tok(t, add_special_tokens=False)["input_ids"]) == t


@pytest.mark.parametrize("k", [0, 1, 12, 29, 30, -1, -5])
def test_smollm_truncated_encoder_equals_full_hidden_state(smollm, smol_tok, k):
    ids = _batch(smol_tok)
    enc = FrozenEncoder(copy.deepcopy(smollm).base_model, k)
    assert enc.truncated == (k % 31 < 30)
    assert len(enc.backbone.layers) == (k % 31 if enc.truncated else 30)
    torch.testing.assert_close(enc(ids, torch.ones_like(ids)), _full_hidden(smollm, ids, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ref", ["tiny:qwen2:layers=3", "tiny:gpt2:layers=3"])
@pytest.mark.parametrize("k", [0, 2, 3, -2])
def test_tiny_truncated_encoder_equals_full_hidden_state(ref, k):
    tok, full = assets.load_tokenizer(ref), assets.load_causal_lm(ref)
    ids = _batch(tok)
    enc = load_encoder(ref, k)
    assert enc.truncated == (k % 4 < 3)
    torch.testing.assert_close(enc(ids, torch.ones_like(ids)), _full_hidden(full, ids, k), rtol=1e-5, atol=1e-5)


def test_encoder_layer_out_of_range_is_refused():
    from coupling_dist.config import ConfigError
    from coupling_dist.stages.preprocess.plan import encoder_info

    info = encoder_info(SMOL, 12, "float16", 49152)
    assert (info["hidden_size"], info["num_layers"], info["model_type"]) == (576, 30, "llama")
    with pytest.raises(ConfigError, match="'encoder.layer' = 31 is out of range"):
        encoder_info(SMOL, 31, "float16", 49152)


@pytest.mark.parametrize("tokenizer,ok", [(SMOL, True), ("asset:qwen2.5-tokenizer", False)])
def test_stage_b_preflight_smollm_teacher(tmp_path, tokenizer, ok):
    from coupling_dist.stages.stage_b.preflight import checked_task_info

    make_pair_store(str(tmp_path), n_train=8, n_heldout=2, tokenizer=tokenizer)
    cfg = demo_cfg(tmp_path, f"stage_b.kd.teacher={SMOL}")
    if not ok:
        with pytest.raises(PreflightError, match=r"stage_b.kd.teacher 'asset:smollm2-135m-gguf' uses tokenizer .*"
                                                 r"KD needs the same tokenizer"):
            checked_task_info(cfg, 1)
        return
    info = checked_task_info(cfg, 1)
    assert info["teacher"]["vocab_size"] == 49152 and info["teacher"]["hidden"] == 576
    assert info["vocab_size"] == 49152 and info["eos_id"] == 2 and info["pad_id"] == 2
