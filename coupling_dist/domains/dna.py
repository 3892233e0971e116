"""DNA (the paper's Fly Brain enhancers, Appendix G.2): a sample is a fixed-length sequence over
{A, C, G, T}, as tokens A=0, C=1, G=2, T=3 (V = 4, fixed length: no EOS, no pad, the mask is all
ones), with a class label kept as the shard field ``label`` (generation is unconditional; the
evaluation classifier is trained on it).

Token order is the sequence order: Stage A groups ``stage_a.patch`` = k consecutive bases into one
latent position, so the latent is [L / k, stage_a.latent_dim] (the paper: compression ratio
0.05 = k 20, latent length 25 for L = 500). The order does not depend on k, so the shard set's
identity does not either (one shard set serves every patch size).

Corpus (``data.corpus``), by file type:
- ``asset:sibelia-genomes``: non-overlapping 500-base windows of the seven complete bacterial
  genomes of the Debian package sibelia-examples (``data/genomes.py``), rows in a fixed random
  order, label = the genome's index -- what the demo uses (the Fly Brain data is not obtainable
  offline);
- a text file (optionally .gz): one sequence per line, optionally followed by a tab or comma and an
  integer label (default 0) -- the asset's format;
- ``.npz``: the Fly Brain benchmark converted (``tools/flybrain_to_npz.py``): ``x`` [N, L, 4]
  one-hot or [N, L] ids, ``y`` [N, C] one-hot or [N] ints (or the benchmark's names
  ``train_data`` / ``y_train``);
- ``.pkl``: the benchmark's own ``DeepFlyBrain_data.pkl`` (keys ``train_data`` [N, 500, 4] one-hot,
  ``y_train`` [N, 81] one-hot, ...), read only because ``data.corpus`` names it, and through a
  restricted unpickler that builds numpy arrays and nothing else (``read_benchmark_pickle``).
The ``.npz`` / ``.pkl`` readers take the benchmark's *train* split; the held-out items are
``data.heldout_fraction`` of it (the pipeline's own split), not its ``valid`` split.

Evaluation (``metric = classifier_frechet``): the Fréchet distance in the features of a small 1-D
CNN trained to tell the labels apart (``feature_net = seq1d``; the FBD analogue: the frozen
DeepFlyBrain classifier is not obtainable), plus per series the k-mer spectrum JS divergence
(k = 1..6) and GC-content statistics against the same reference (``extra_metrics``,
``evaluation/dna_metrics.py``).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
from typing import Iterator, Optional

import numpy as np

from ..config import ConfigError
from .base import LabelledCodecDomain

ALPHABET = "ACGT"
MIN_LENGTH = 144  # the seq1d classifier's receptive field (evaluation/feature_net.py)


class DnaCodec:
    """Sequences <-> token rows. Preprocess: (ids uint8 [L], label) items -> tokens; sampling:
    ``len()`` = 4 ids, ``to_records`` writes each sample as its ACGT string."""

    def __len__(self) -> int:
        return len(ALPHABET)

    def encode_items(self, items: list) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """(tokens int32 [B, L], mask uint8 ones, 0 truncated, {"label": int16 [B, 1]})."""
        tokens = np.stack([ids for ids, _ in items]).astype(np.int32)
        labels = np.array([[lab] for _, lab in items], dtype=np.int16)
        return tokens, np.ones(tokens.shape, dtype=np.uint8), 0, {"label": labels}

    def to_records(self, ids, indices, settings) -> list[dict]:
        from ..data.genomes import decode_dna

        sdict = settings.to_dict()
        return [{"index": int(i), "sequence": s, "settings": sdict}
                for s, i in zip(decode_dna(np.asarray(ids)), indices)]


# --------------------------------------------------------------------------- corpus readers
def _bad(path: str, where: str, what: str):
    from ..data.corpus import CorpusError

    return CorpusError(f"{path}: {where}{what}")


def read_sequence_file(path: str, length: int, limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, int]]:
    """(ids uint8 [length], label) per line 'SEQUENCE[<tab or comma>LABEL]'; bad lines name file + line."""
    from ..data.genomes import dna_ids

    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    with opener(path, "rt", encoding="ascii", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if limit is not None and n >= limit:
                return
            seq, sep, lab = line.replace(",", "\t").partition("\t")
            try:
                ids = dna_ids(seq.strip().upper())
            except ValueError as e:
                raise _bad(path, f"line {lineno}: ", f"the sequence {e}") from None
            if len(ids) != length:
                raise _bad(path, f"line {lineno}: ", f"{len(ids)} bases, but 'data.seq_len' is {length} (data.domain "
                           f"dna reads fixed-length sequences)")
            try:
                label = int(lab) if sep else 0
            except ValueError:
                raise _bad(path, f"line {lineno}: ", f"label {lab!r} is not an integer") from None
            if not 0 <= label < 2 ** 15:
                raise _bad(path, f"line {lineno}: ", f"label {label} outside 0..32767")
            yield ids, label
            n += 1


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays, dtypes and plain containers; any other class or function is refused
    (a pickle can run arbitrary code through them)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),  # _frombuffer: protocol 5
               ("_codecs", "encode")}  # array bytes in protocols 0-2 (str -> bytes, nothing else)

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays are read from a pickle)")


def read_benchmark_pickle(path: str) -> dict:
    """The Fly Brain benchmark pickle (a dict of numpy arrays) through ``_ArraysOnly``."""
    try:
        with open(path, "rb") as fh:
            obj = _ArraysOnly(io.BufferedReader(fh)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise _bad(path, "", f"not readable as the Fly Brain benchmark pickle ({e}); convert it with "
                   f"tools/flybrain_to_npz.py on a machine you trust, or pass an .npz") from None
    if not isinstance(obj, dict):
        raise _bad(path, "", f"holds a {type(obj).__name__}, expected a dict of arrays (train_data, y_train, ...)")
    return obj


def _pick(arrays, path: str, names: tuple[str, ...]) -> np.ndarray:
    for n in names:
        if n in arrays:
            return np.asarray(arrays[n])
    raise _bad(path, "", f"has none of the arrays {list(names)} (has {sorted(arrays)[:8]})")


def read_array_file(path: str, length: int, limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, int]]:
    """Items of an .npz (``x``/``y`` or ``train_data``/``y_train``) or the benchmark .pkl."""
    if path.endswith(".pkl"):
        arrays = read_benchmark_pickle(path)
    else:
        try:
            arrays = dict(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise _bad(path, "", f"not a readable .npz without pickled objects ({e})") from None
    x = _pick(arrays, path, ("x", "train_data"))
    y = _pick(arrays, path, ("y", "y_train")) if any(k in arrays for k in ("y", "y_train")) else np.zeros(len(x), int)
    if x.ndim == 3:  # one-hot [N, L, 4] (the benchmark's layout; order A, C, G, T)
        if x.shape[2] != 4:
            raise _bad(path, "", f"one-hot sequences must be [N, L, 4]; got {list(x.shape)}")
        x = x.argmax(-1)
    if y.ndim == 2:
        y = y.argmax(-1)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise _bad(path, "", f"expected sequences [N, L] (or [N, L, 4]) and labels [N] (or [N, C]); got "
                   f"{list(x.shape)} and {list(y.shape)}")
    if x.shape[1] != length:
        raise _bad(path, "", f"{x.shape[1]} bases per sequence, but 'data.seq_len' is {length}")
    if x.size and (x.min() < 0 or x.max() > 3):
        raise _bad(path, "", f"token ids must lie in 0..3 (A, C, G, T); got [{x.min()}, {x.max()}]")
    n = len(x) if limit is None else min(limit, len(x))
    for i in range(n):
        yield x[i].astype(np.uint8), int(y[i])


def write_gc_histogram(samples: np.ndarray, reference: np.ndarray, path: str, title: str) -> str:
    """Histogram of per-sequence GC fraction, samples beside real held-out sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..components.atomic import write_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, 1, 51)
    for arr, label in ((reference, "held-out"), (samples, "samples")):
        if len(arr):
            ax.hist(np.isin(arr, (1, 2)).mean(1), bins=bins, alpha=0.55, density=True, label=f"{label} ({len(arr)})")
    ax.set_xlabel("GC fraction per sequence")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


class DnaDomain(LabelledCodecDomain):
    name = "dna"
    metric = "classifier_frechet"
    feature_net = "seq1d"
    n_classes = 0  # from the shards' labels (7 genomes for the asset, 81 for Fly Brain)
    extra_columns = ("kmer_js_1", "kmer_js_2", "kmer_js_3", "kmer_js_4", "kmer_js_5", "kmer_js_6", "kmer_js_mean",
                     "gc_mean", "gc_std", "gc_w1")
    summary_columns = (("kmer_js_mean", "k-mer JS"), ("gc_w1", "GC W1"))
    eval_outputs = (("metrics table", "results.csv"), ("results table", "results.md"), ("k-mer plot", "kmer_js.png"))
    learned_encoder, no_teacher_for, alphabet_note = "base", "DNA", "four ids"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.length = int(cfg.data.seq_len)
        self.codec = DnaCodec()

    def check_config(self) -> None:
        if self.length < MIN_LENGTH:
            raise ConfigError(f"'data.seq_len' = {self.length}: data.domain dna needs >= {MIN_LENGTH} bases (the "
                              f"evaluation classifier's receptive field); the demo and the paper use 500")
        super().check_config()

    def tokenizer_identity(self) -> dict:
        ident = {"name": f"dna:{ALPHABET}:len{self.length}", "vocab_size": 4, "eos_id": None, "pad_id": None,
                 "fixed_length": True, "alphabet": ALPHABET, "length": self.length}
        return self.hashed_identity(ident)

    def iter_items(self, files: list[str], limit: Optional[int] = None) -> Iterator[tuple[np.ndarray, int]]:
        n = 0
        for path in files:
            left = None if limit is None else limit - n
            if left is not None and left <= 0:
                return
            reader = read_array_file if path.endswith((".npz", ".pkl")) else read_sequence_file
            for item in reader(path, self.length, left):
                yield item
                n += 1

    def sample_file_tokens(self, path: str) -> np.ndarray:
        from ..data.genomes import encode_dna

        seqs = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    seqs.append(json.loads(line)["sequence"])
        return encode_dna(seqs).astype(np.int64) if seqs else np.zeros((0, self.length), dtype=np.int64)

    # ------------------------------------------------------------------ evaluation extras
    def extra_metrics(self, tokens: np.ndarray, reference: np.ndarray) -> dict:
        """k-mer JS (bits) per k and their mean, GC mean / std and the GC Wasserstein-1 to ``reference``."""
        from ..evaluation.dna_metrics import token_metrics

        return token_metrics(tokens, reference)

    def write_eval_figures(self, rows: list[dict], out_dir: str) -> list[str]:
        """``kmer_js.png``: k-mer JS divergence against k, one line per evaluated series."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..components.atomic import write_path

        ks = [int(c[len("kmer_js_"):]) for c in self.extra_columns if c[len("kmer_js_"):].isdigit()]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for r in rows:
            ax.plot(ks, [max(r[f"kmer_js_{k}"], 1e-7) for k in ks], marker="o", label=r["name"])
        ax.set_yscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("k-mer spectrum JS divergence (bits)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "kmer_js.png")
        write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return [path]

    def write_pictures(self, samples_path: str, out_dir: str) -> list[str]:
        """``gc.png``: the samples' GC-content histogram beside held-out sequences'."""
        from ..components.paths import data_dir
        from ..data.shards import iter_shards

        real = []
        for samples in iter_shards(data_dir(self.cfg), "heldout", fields=["tokens"]):
            real += [s["tokens"] for s in samples]
            if len(real) >= 2000:
                break
        real = np.stack(real).astype(np.int64) if real else np.zeros((0, self.length), dtype=np.int64)
        return [write_gc_histogram(self.sample_file_tokens(samples_path), real, os.path.join(out_dir, "gc.png"),
                                   os.path.basename(samples_path))]
