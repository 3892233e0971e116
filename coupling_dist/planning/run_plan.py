"""The run's plan: bytes per artifact and FLOPs per stage, from the config alone (no weights loaded,
nothing written), and the disk pre-flight of the stages that write.

Sources, in order of trust:
- samples: ``--samples N`` when given; else the shard set's manifest (exact) when preprocess ran;
  else the corpus: Parquet row counts from the file metadata, text / JSONL files up to
  ``EXACT_BYTES`` counted sentence by sentence as preprocess reads them, larger ones estimated from
  the sentences in their first ``SAMPLE_BYTES``; capped at ``data.max_samples``;
- bytes: ``storage`` (measured on an existing shard, else estimated on stand-ins);
- FLOPs: the models' own accounting (``flops_per_sample`` / ``flops_per_token``, what the trainer's
  MFU uses) on models built on the meta device; the frozen LMs from their configs
  (``architectures``). Training FLOPs are 3x forward; frozen LMs and the pair store run forward only.

``stage_a.online_encoder`` (read with getattr: a config without it plans precomputed features):
when true, preprocess stores no features and Stage A / the pair store run the frozen encoder on
every batch, so their FLOPs include its forward pass.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..components import assets
from ..components.paths import data_dir, pair_store_dir, stage_a_export, stage_dir, generator_export, samples_file
from ..components.preflight import PreflightError
from ..config import Config
from ..data import corpus as C
from ..data.shards import Manifest
from . import architectures as A
from . import storage as St

EXACT_BYTES = 256 * 10**6  # text / JSONL files up to this size are counted exactly
SAMPLE_BYTES = 16 * 10**6  # larger ones: sentences per byte in their first 16 MB
TOKEN_ROWS = 256  # corpus rows tokenized for the tokens / mask stand-ins
SCAN_SAMPLES = 200_000  # data.vocab=corpus: up to this many samples, the compact vocabulary is collected
IGNORE_KEY = "run.ignore_disk_check"
WRITES = {"preprocess": "data.out_dir", "stage_a": "run.dir", "pair_store": "run.dir"}  # stage -> where to point


class PlanError(PreflightError):
    """The plan cannot be made (no corpus and no --samples, an unknown model): exit status 2."""


@dataclass
class Artifact:
    stage: str
    name: str
    path: str
    bytes: int
    note: str = ""
    peak: Optional[int] = None  # bytes at the worst moment when larger (checkpoints while saving)


@dataclass
class Compute:
    stage: str
    flops: float
    note: str
    steps: Optional[int] = None


@dataclass
class Plan:
    config: str
    samples: int
    seq_len: int
    precision: str  # what train.precision "auto" means in this plan
    artifacts: list = field(default_factory=list)
    compute: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def count_corpus(cfg: Config) -> tuple[int, str]:
    """(samples, how they were counted); FileNotFoundError / ValueError when the corpus is missing."""
    d = cfg.data
    files = assets.resolve_corpus(d.corpus)
    n, estimated = 0, []
    for path in files:
        kind = C.detect_format(path, d.format)
        if kind == "parquet":
            import pyarrow.parquet as pq

            n += int(pq.ParquetFile(path).metadata.num_rows)
        elif os.path.getsize(path) <= EXACT_BYTES:
            n += sum(1 for _ in C.iter_file(path, d.format, d.text_field))
        else:
            n += _estimate_lines(path)
            estimated.append(os.path.basename(path))
        if d.max_samples and n >= d.max_samples:
            break
    how = (f"estimated from the sentences in the first {St.human(SAMPLE_BYTES)} of {len(estimated)} large file(s)"
           if estimated else "counted in the corpus")
    if d.max_samples and n > d.max_samples:
        return d.max_samples, f"(data.max_samples; the corpus has more, {how})"
    return n, f"{how} ({len(files)} file(s))"


def _estimate_lines(path: str) -> int:
    import gzip

    size = os.path.getsize(path)
    with open(path, "rb") as raw:
        fh = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        lines = 0
        for line in fh:
            lines += bool(line.strip())
            if raw.tell() >= SAMPLE_BYTES:
                break
        return int(round(lines * size / max(1, raw.tell())))


def _checkpoints(steps: int, interval: int, keep: int) -> tuple[int, int]:
    """(checkpoints kept at the end, most on disk at once): saved at every multiple of the interval
    and at the last step; the newest ``keep`` are kept, one more exists while the next is saved."""
    saved = steps // interval + (steps % interval != 0)
    return min(keep, saved), min(keep + 1, saved)


class Planner:
    """One config's plan, stage by stage (each stage method returns its artifacts and compute)."""

    def __init__(self, cfg: Config, samples: Optional[int] = None, accelerator: bool = False,
                 tokenize: bool = True):
        self.cfg, self.notes, self.tokenize = cfg, [], tokenize
        self.online = cfg.stage_a.online_encoder
        self.data = data_dir(cfg)
        self.source = Manifest.load(self.data) if os.path.isfile(Manifest.path(self.data)) else None
        self.T = self.source.seq_len if self.source else cfg.data.seq_len
        self.auto_precision = "bf16" if accelerator else "fp32"  # the trainer's "auto": bf16 on CUDA
        self._samples_arg = samples
        self._cache: dict = {}

    # ------------------------------------------------------------------ inputs

    def _once(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def counts(self) -> list[int]:
        return self._once("counts", self._counts)

    def _counts(self) -> list[int]:
        d = self.cfg.data
        if self._samples_arg is not None:
            n = min(self._samples_arg, d.max_samples or self._samples_arg)
            try:
                assets.resolve_corpus(d.corpus)
                self.notes.append(f"samples: {n:,} from --samples")
            except (FileNotFoundError, ValueError, OSError):
                self.notes.append(f"samples: corpus not found ({d.corpus}); using --samples {n:,}")
        elif self.source is not None:
            self.notes.append(f"samples: from the shard set's manifest {Manifest.path(self.data)}")
            return [int(s["count"]) for s in self.source.to_dict()["shards"]]
        else:
            try:
                n, how = count_corpus(self.cfg)
            except (FileNotFoundError, ValueError, OSError) as e:
                raise PlanError(f"data.corpus {d.corpus!r}: corpus not found ({e}); pass --samples N to plan "
                                f"for N sentences") from None
            self.notes.append(f"samples: {n:,} {how}")
        return St.shard_counts(n, d.heldout_fraction, d.shard_size)

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def n_train(self) -> int:
        if self.source is not None:
            return self.source.num_samples("train")
        return St.shard_counts(self.n, self.cfg.data.heldout_fraction, 1 << 62)[0]

    def encoder(self) -> Optional[A.LMShape]:
        ref = self.cfg.encoder.model
        if ref is None:
            return None
        shape = A.lm_shape(ref)
        if shape is None:
            raise PlanError(f"encoder.model {ref!r}: its config cannot be loaded here and it is not one of the "
                            f"built-in architectures ({sorted(A.KNOWN)}); point it at a local model directory")
        if shape.source != "config":
            self._note(shape.source)
        return shape

    def _note(self, text: str) -> None:
        if text and text not in self.notes:
            self.notes.append(text)

    @property
    def feature_dim(self) -> int:
        if self.source is not None and "features" in self.source.fields:
            return int(self.source.fields["features"]["shape"][-1])
        enc = self.encoder()
        return enc.hidden if enc is not None else 0

    def tok_vocab(self) -> int:
        if self.source is not None and (self.source.tokenizer or {}).get("vocab_size"):
            return int(self.source.tokenizer["vocab_size"])
        size, note = A.tokenizer_vocab(self.cfg.data.tokenizer)
        if size is None:
            raise PlanError(f"data.tokenizer {self.cfg.data.tokenizer!r}: {note}; point it at a local tokenizer")
        self._note(note)
        return size

    def head_vocab(self) -> int:
        """Stage A's head: the tokenizer's vocabulary, or under ``data.vocab: corpus`` the ids the
        shard set uses (``data/vocab.py``): its ``vocab.json`` once Stage A built it; else the same set
        collected read-only, from the shards or (before preprocessing) by tokenizing the corpus as
        preprocess does, when it holds at most ``SCAN_SAMPLES`` sentences; else the full vocabulary
        (an upper bound)."""
        return self._once("head_vocab", self._head_vocab)

    def _head_vocab(self) -> int:
        if self.cfg.data.vocab != "corpus":
            return self.tok_vocab()
        path = os.path.join(self.data, "vocab.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return len(json.load(fh)["ids"])
        ids: Optional[set] = None
        if self.n <= SCAN_SAMPLES and self.source is not None:
            from ..data.shards import iter_shards

            ids = {int(t) for samples in iter_shards(self.data, fields=["tokens"]) for smp in samples
                   for t in np.unique(smp["tokens"])}
            tok = self.source.tokenizer or {}
            ids |= {int(tok[k]) for k in ("eos_id", "pad_id") if tok.get(k) is not None}
        elif self.n <= SCAN_SAMPLES and self.tokenize:
            tok, _ = A.load_tokenizer(self.cfg.data.tokenizer)
            try:
                files = assets.resolve_corpus(self.cfg.data.corpus)
                texts = list(C.iter_corpus(files, self.cfg.data.format, self.cfg.data.text_field, limit=self.n))
            except (FileNotFoundError, ValueError, OSError):
                texts = []
            if tok is not None and texts:
                ids = {i for row in tok(texts, add_special_tokens=False)["input_ids"] for i in row[:self.T]}
                ids |= {int(tok.eos_token_id), int(tok.pad_token_id)}
        if ids:
            self._note(f"data.vocab=corpus: {len(ids):,} ids in the corpus (collected as data/vocab.py does)")
            return len(ids)
        self._note("data.vocab=corpus: the compact vocabulary is not known before preprocessing this corpus; "
                   "heads planned at the full vocabulary (an upper bound)")
        return self.tok_vocab()

    def stage_a_model(self):
        def build():
            import torch

            from ..models.stage_a import StageAModel

            with torch.device("meta"):
                return StageAModel(self.feature_dim, self.head_vocab(), self.cfg.stage_a)
        return self._once("stage_a_model", build)

    def token_sizes(self) -> dict:
        """tokens / mask FieldSizes: measured on the source shards, else real corpus rows, else stand-ins."""
        return self._once("token_sizes", self._token_sizes)

    def _token_sizes(self) -> dict:
        T = self.T
        specs = {"tokens": ("int32", (T,)), "mask": ("uint8", (T,))}
        if self.source is not None:
            src_specs = St.field_specs(self.source.fields)
            measured = St.measure_shard(self.data, src_specs)
            if measured:
                return {k: measured[k] for k in specs}
        rows, source = None, f"stand-in: {St.STAND_IN_LENGTH}-token sentences"
        eos = pad = 0
        if self.tokenize:  # the stages' disk checks skip it (a tokenizer load): members are 1-2 blocks anyway
            tok, _ = A.load_tokenizer(self.cfg.data.tokenizer)
            try:
                files = assets.resolve_corpus(self.cfg.data.corpus)
                texts = list(C.iter_corpus(files, self.cfg.data.format, self.cfg.data.text_field, limit=TOKEN_ROWS))
            except (FileNotFoundError, ValueError, OSError):
                texts = []
            if tok is not None:
                eos, pad = int(tok.eos_token_id), int(tok.pad_token_id)
                if texts:
                    rows = tok(texts, add_special_tokens=False)["input_ids"]
                    source = f"{len(texts)} tokenized corpus rows"
        if rows is None:
            rng = np.random.default_rng(0)
            rows = [list(rng.integers(0, 50000, St.STAND_IN_LENGTH - 1)) for _ in range(TOKEN_ROWS)]
        toks, masks = St.token_rows(rows, T, eos, pad)
        return {"tokens": St.size_of("tokens", "int32", (T,), toks, source),
                "mask": St.size_of("mask", "uint8", (T,), masks, source)}

    def float_size(self, name: str, dtype: str, shape: tuple, vocab: int = 0) -> St.FieldSize:
        rng = np.random.default_rng(0)
        arrays = St.stand_in_arrays(name, dtype, shape, St.STAND_IN_ROWS, vocab, rng)
        what = "random ids" if name == "teacher_ids" else "Gaussian values"
        return St.size_of(name, dtype, shape, arrays, f"stand-in: {what}")

    def _shard_set(self, stage: str, name: str, path: str, specs: dict, known: dict) -> Artifact:
        sizes = St.measure_shard(path, specs) or {}
        for fld, (dtype, shape) in specs.items():
            if fld not in sizes:
                sizes[fld] = known.get(fld) or self.float_size(fld, dtype, shape,
                                                               self.tok_vocab() if fld == "teacher_ids" else 0)
        per = sum(s.member for s in sizes.values())
        parts = ", ".join(f"{f} {St.human(s.member)} (zstd {St.human(s.payload)} of {St.human(s.raw)}; {s.source})"
                          for f, s in sizes.items())
        return Artifact(stage, name, path, St.shard_set_bytes(self.counts, per),
                        f"{self.n:,} samples x {St.human(per)}: {parts}")

    # ------------------------------------------------------------------ stages

    def features_spec(self) -> dict:
        enc = self.cfg.encoder
        return {"features": (enc.dtype, (self.T, self.feature_dim))} if enc.model is not None else {}

    def preprocess(self, compute: bool = True) -> tuple[list, list]:
        T = self.T
        specs = {"tokens": ("int32", (T,)), "mask": ("uint8", (T,))}
        if not self.online:
            specs.update(self.features_spec())
        art = self._shard_set("preprocess", "shard set", self.data, specs, self.token_sizes())
        if self.cfg.data.vocab == "corpus":  # Stage A caches the compact vocabulary beside the manifest
            art.bytes += St.ids_json_bytes(self.head_vocab())
            art.note += "; vocab.json"
        if self.features_spec():
            (dt, shape), = self.features_spec().values()
            feats = St.measure_shard(self.data, dict(specs, features=(dt, shape))).get("features") \
                or self.float_size("features", dt, shape)
            stored = (f"{dt} [{T}, {shape[1]}] zstd-compressed to {feats.ratio:.2f} of raw, "
                      f"{St.human(feats.member * self.n)}")
            self._note(f"features: not stored (stage_a.online_encoder=true: the encoder runs in Stage A and the pair "
                       f"store); stored they would take {stored}" if self.online else
                       f"features: stored, {stored} of the shard set; stage_a.online_encoder=true would store none "
                       f"(the encoder then runs in Stage A and the pair store)")
        comp = []
        if compute and self.cfg.encoder.model is not None and not self.online:
            fpt = self.encoder_fpt()
            comp.append(Compute("preprocess", self.n * T * fpt, f"frozen encoder forward, {fpt:.3g} FLOP/token"))
        return [art], comp

    def encoder_fpt(self) -> float:
        return A.encoder_flops_per_token(self.encoder(), self.cfg.encoder.layer, self.T)

    def _train_artifacts(self, stage: str, params: int, export_params: int, export_dir: str) -> list:
        t = getattr(self.cfg, stage).train
        precision = self.auto_precision if t.precision == "auto" else t.precision
        one = St.checkpoint_bytes(params, precision, t.ema_decay is not None)
        kept, peak = _checkpoints(t.steps, t.ckpt_interval, t.keep_last)
        return [Artifact(stage, f"checkpoints ({kept} kept)", os.path.join(stage_dir(self.cfg, stage), "checkpoints"),
                         kept * one, f"{params:,} params x {one / params:.0f} B ({precision} module + fp32 Adam"
                         f"{' + EMA' if t.ema_decay else ''}); {peak} on disk while saving", peak * one),
                Artifact(stage, "export", export_dir, St.export_bytes(export_params, self._export_ids()),
                         "fp32 weights + config.json")]

    def _export_ids(self) -> int:
        """Tokenizer ids an export's config.json lists (the compact vocabulary), else 0."""
        return self.head_vocab() if self.cfg.data.vocab == "corpus" else 0

    def _train_compute(self, stage: str, fps: float, extra_fwd: float, what: str) -> Compute:
        """Training FLOPs: (fps + frozen forward per sample) x batch x steps, plus the held-out
        evaluation batches (forward only)."""
        t = getattr(self.cfg, stage).train
        evals = (t.steps // t.eval_interval) * t.eval_batches * t.batch_size
        flops = (fps + extra_fwd) * t.batch_size * t.steps + (fps / 3 + extra_fwd) * evals
        return Compute(stage, flops, f"{what}; {(fps + extra_fwd) * t.batch_size:.3g} FLOP/step x "
                                     f"{t.steps:,} steps (batch {t.batch_size})", t.steps)

    def stage_a(self, compute: bool = True) -> tuple[list, list]:
        model = self.stage_a_model()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        full = params + sum(b.numel() for b in model.buffers())
        arts = self._train_artifacts("stage_a", params, full, stage_a_export(self.cfg))
        comp = []
        if compute:
            enc = self.T * self.encoder_fpt() if self.online and self.cfg.encoder.model else 0.0
            t = self.cfg.stage_a.train
            epochs = t.steps * t.batch_size / max(1, self.n_train)
            comp.append(self._train_compute("stage_a", model.flops_per_sample(self.T), enc,
                                            "projection + flow + decoder" + (" + online encoder forward" if enc else "")
                                            + f"; {epochs:.2f} epochs of the train split"))
        return arts, comp

    def pair_store(self, compute: bool = True) -> tuple[list, list]:
        ps, T, d = self.cfg.pair_store, self.T, self.cfg.stage_a.latent_dim
        specs = {"z": (ps.dtype, (ps.multiplicity, T, d)), "tokens": ("int32", (T,)), "mask": ("uint8", (T,))}
        if ps.teacher_topk:
            from ..models.teacher import cache_fields

            specs.update(St.field_specs(cache_fields(T, ps.teacher_topk)))
        art = self._shard_set("pair_store", "pair store", pair_store_dir(self.cfg), specs, self.token_sizes())
        comp = []
        if compute:
            model = self.stage_a_model()
            proj = 2 * model.feature_dim * d * (2 if model.logvar is not None else 1)
            per = ps.multiplicity * T * (proj + model.flow.flops_per_token(T))
            what = [f"projection + flow forward x {ps.multiplicity} latents"]
            if self.online and self.cfg.encoder.model:
                per += T * self.encoder_fpt()
                what.append("online encoder forward")
            if ps.teacher_topk:
                per += T * A.lm_flops_per_token(self.teacher(), T)
                what.append(f"KD teacher forward (top-{ps.teacher_topk} cache)")
            comp.append(Compute("pair_store", per * self.n, " + ".join(what)))
        return [art], comp

    def teacher(self) -> Optional[A.LMShape]:
        ref = self.cfg.stage_b.kd.teacher
        shape = A.lm_shape(ref)
        if ref is not None and shape is None:
            raise PlanError(f"stage_b.kd.teacher {ref!r}: config not loadable here and not built in")
        if shape is not None and shape.source != "config":
            self._note(shape.source)
        return shape

    def generator(self):
        """Stage B's generator on the meta device, at the head size its pre-flight picks."""
        import torch

        from ..models.composite_generator import composite_arch
        from ..models.generator import build_generator

        sb, kd = self.cfg.stage_b, self.cfg.stage_b.kd
        masked = sb.model.kind == "masked"
        teacher = self.teacher() if kd.teacher is not None and kd.weight > 0 else None
        lcm = math.lcm(1024, 128 * sb.tp)
        if self.cfg.data.vocab == "corpus":
            vocab = math.ceil((self.head_vocab() + masked) / lcm) * lcm
        elif teacher is not None:
            vocab = teacher.vocab
        else:
            vocab = math.ceil((self.tok_vocab() + masked) / lcm) * lcm
        arch = composite_arch(self.cfg.stage_a) if sb.model.kind == "composite" else sb.model
        with torch.device("meta"):
            gen = build_generator(arch, self.cfg.stage_a.latent_dim, self.T, vocab, vocab - 1 if masked else None)
        return gen, vocab, teacher

    def stage_b(self, compute: bool = True) -> tuple[list, list]:
        gen, vocab, teacher = self.generator()
        params = sum(p.numel() for p in gen.parameters())
        arts = self._train_artifacts("stage_b", params, params, generator_export(self.cfg))
        comp = []
        if compute:
            live = teacher is not None and self.cfg.stage_b.kd.source == "live"
            t_fwd = self.T * A.lm_flops_per_token(teacher, self.T, vocab) if live else 0.0
            comp.append(self._train_compute("stage_b", gen.flops_per_sample(self.T), t_fwd,
                                            "generator" + (" + live KD teacher forward" if live else "")))
        return arts, comp

    def sample(self, compute: bool = True) -> tuple[list, list]:
        s = self.cfg.sample
        art = Artifact("sample", "samples", samples_file(self.cfg), s.num_samples * (5 * self.T + 100),
                       "about 5 bytes of JSON text per token")
        comp = []
        if compute:
            gen, _, _ = self.generator()
            comp.append(Compute("sample", s.num_samples * s.steps * gen.flops_per_sample(self.T) / 3,
                                f"{s.steps} generator forward pass(es) per sample"))
        return [art], comp

    def evaluate(self, compute: bool = True) -> tuple[list, list]:
        e = self.cfg.evaluate
        if not compute:
            return [], []
        scorer = A.lm_shape(e.scorer)
        if scorer is None:  # a negligible stage: say so rather than refuse the whole plan
            self._note(f"evaluate.scorer {e.scorer!r}: config not loadable here and not built in; evaluate not planned")
            return [], []
        if scorer.source != "config":
            self._note(scorer.source)
        gen, _, _ = self.generator()
        rows = len(e.temperatures) * len(e.latent_scales) * len(e.top_ps)
        sweep = rows * len(e.steps) + (rows if e.stage_a_series else 0) if e.sweep else 0
        score_tok = min(self.T, 256) * A.lm_flops_per_token(scorer, min(self.T, 256))
        flops = sweep * e.num_samples * (gen.flops_per_sample(self.T) / 3 + score_tok)
        flops += (e.num_samples if e.factorized_series else 0) * score_tok + e.reference_samples * score_tok
        return [], [Compute("evaluate", flops, f"{sweep} sweep rows x {e.num_samples} samples: generator + "
                                                f"scorer forward (T tokens each); reference and factorized rows")]


STAGES = ("preprocess", "stage_a", "pair_store", "stage_b", "sample", "evaluate")


def build_plan(cfg: Config, config_path: str = "", samples: Optional[int] = None, accelerator: bool = False) -> Plan:
    p = Planner(cfg, samples, accelerator)
    plan = Plan(config_path, 0, p.T, p.auto_precision)
    for stage in STAGES:
        arts, comp = getattr(p, stage)()
        plan.artifacts += arts
        plan.compute += comp
    plan.samples, plan.notes = p.n, p.notes
    return plan


def check_disk(cfg: Config, stage: str, samples: Optional[int] = None, show: bool = True) -> list:
    """Before ``stage`` writes: print what it will write and the target's free space (``show``: rank 0),
    and refuse (``PreflightError`` naming the path, the bytes needed and free, and ``run.ignore_disk_check``)
    when it does not fit. Bytes already there (a resumed run) count as written."""
    torch = sys.modules.get("torch")  # only the training stages' precision depends on it; they import torch
    p = Planner(cfg, samples, accelerator=bool(torch and torch.cuda.is_available()), tokenize=False)
    arts, _ = getattr(p, stage)(compute=False)
    groups: dict = {}
    for a in arts:
        base = St.nearest_existing(a.path)
        g = groups.setdefault(os.stat(base).st_dev, {"base": base, "need": 0, "arts": []})
        g["need"] += max(0, (a.peak or a.bytes) - St.existing_bytes(a.path))
        g["arts"].append(a)
    for g in groups.values():
        free = shutil.disk_usage(g["base"]).free
        what = "; ".join(f"{a.name} {St.human(a.peak or a.bytes)} at {a.path} ({a.note})" for a in g["arts"])
        if show:
            print(f"[plan] {stage} will write: {what}; still to write {St.human(g['need'])}, free "
                  f"{St.human(free)} on {g['base']}", flush=True)
        if g["need"] > free:
            msg = (f"{stage} needs {St.human(g['need'])} ({g['need']:,} bytes) more at "
                   f"{', '.join(a.path for a in g['arts'])} but {g['base']} has only {St.human(free)} ({free:,} bytes) "
                   f"free; free space or point {WRITES.get(stage, 'run.dir')} at a larger disk, or set "
                   f"{IGNORE_KEY}=true to start anyway")
            if not cfg.run.ignore_disk_check:
                raise PreflightError(msg)
            if show:
                print(f"[plan] warning ({IGNORE_KEY}=true): {msg}", flush=True)
    return arts
