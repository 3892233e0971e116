"""``python -m coupling_dist.sample --config FILE [overrides]``: draw samples from the exported
generator (``run.dir/stage_b/export`` unless ``sample.export`` says otherwise) and write
``run.dir/sample/samples.jsonl`` (or ``sample.out``): one JSON object per sample, in index order::

    {"index": 0, "text": "...", "ids": [...], "eos": true, "settings": {...}}

``ids`` are the generator token ids before the first end-of-sequence token and ``text`` is their
decoding with the data tokenizer; ``eos`` says whether an EOS was generated at all.

Needs only torch + safetensors + the tokenizer: the export is loaded by
``coupling_dist.models.generator.load_generator`` (no DeepSpeed / megatron-core).

Multi-rank (torchrun / srun / Ray-actor ranks under ``ray job submit`` or with
``sample.ray_workers``): rank r draws the contiguous block r of the N sample indices. Each
sample's randomness is a function of (seed, index) (see ``sampling.onestep``), so the merged file
is the same for any number of ranks. Ranks write part files; rank 0 merges them in rank order into
a temp file and renames it into place (readers never see a partial file), then removes the parts.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import torch

from .cli import run_entry
from .components import dist as D
from .components.logging import get_logger, progress, setup_logging
from .sampling.onestep import SampleSettings
from .sampling.p2_self import sample_any

log = get_logger("sample")


def export_dir(cfg) -> str:
    return cfg.sample.export or os.path.join(cfg.stage_dir("stage_b"), "export")


def load_export(path: str, device="cpu"):
    """(model in eval mode, meta) from an export directory, with a clear error when it is missing."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no exported generator at '{path}' (expected config.json + model.safetensors; "
                                f"run stage_b first or set sample.export)")
    from .models.generator import load_generator

    model, meta = load_generator(path, device=str(device))
    model.eval()
    for key in ("seq_len", "latent_dim", "vocab_size", "eos_id"):
        if key not in meta:
            raise ValueError(f"export '{path}': config.json meta lacks '{key}'")
    return model, meta


def tokenizer_ref(meta: dict, cfg=None) -> str:
    ref = meta.get("tokenizer")
    if isinstance(ref, dict):
        ref = ref.get("name")
    if not ref:
        if cfg is None:
            raise ValueError("export meta names no tokenizer and no config was given")
        ref = cfg.data.tokenizer
    return ref


def settings_from_cfg(cfg, **over) -> SampleSettings:
    s = cfg.sample
    temperature = s.step_temperatures if (s.step_temperatures and s.steps > 1) else s.temperature
    kw = dict(temperature=temperature, top_p=s.top_p, latent_scale=s.latent_scale, steps=s.steps, eta=s.eta,
              kappa=s.kappa, seed=s.seed)
    kw.update(over)
    return SampleSettings(**kw)


def truncate_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    ids = [int(i) for i in ids]
    if eos_id in ids:
        return ids[:ids.index(eos_id)], True
    return ids, False


def to_records(ids: torch.Tensor, indices: Sequence[int], tok, eos_id: int, settings: SampleSettings) -> list[dict]:
    recs = []
    sdict = settings.to_dict()
    for row, index in zip(ids.tolist(), indices):
        kept, eos = truncate_at_eos(row, eos_id)
        recs.append({"index": int(index), "text": tok.decode(kept, skip_special_tokens=False), "ids": kept,
                     "eos": eos, "settings": sdict})
    return recs


def rank_block(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def generate_records(model, meta: dict, tok, indices: Sequence[int], settings: SampleSettings, *,
                     batch_size: int, device="cpu", show_progress: bool = False) -> list[dict]:
    bar = progress(total=len(indices), desc="sample", enabled=show_progress) if show_progress else None
    ids = sample_any(model, meta, list(indices), settings, batch_size=batch_size, device=device,
                     vocab_limit=len(tok), progress=(bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    return to_records(ids, indices, tok, int(meta["eos_id"]), settings)


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_sampling(model, meta: dict, tok, out_path: str, settings: SampleSettings, num_samples: int,
                 batch_size: int, device="cpu", show_progress: bool = False) -> dict:
    """Draw this rank's block, write its part, and (rank 0) merge the parts into ``out_path``."""
    r, w = D.rank(), D.world_size()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    idx = rank_block(num_samples, r, w)
    t0 = time.perf_counter()
    recs = generate_records(model, meta, tok, idx, settings, batch_size=batch_size, device=device,
                            show_progress=show_progress and r == 0)
    elapsed = time.perf_counter() - t0
    part = f"{out_path}.part-{r:05d}-of-{w:05d}"
    _write_jsonl(part, recs)
    ok = D.all_ok(True)
    if r == 0 and ok:
        parts = [f"{out_path}.part-{i:05d}-of-{w:05d}" for i in range(w)]
        tmp = f"{out_path}.tmp.{os.getpid()}"
        n = 0
        with open(tmp, "w", encoding="utf-8") as out:
            for p in parts:
                with open(p, encoding="utf-8") as fh:
                    for line in fh:
                        rec = json.loads(line)
                        if rec["index"] != n:  # parts are contiguous blocks in rank order
                            raise RuntimeError(f"merge: {p} holds index {rec['index']}, expected {n}")
                        out.write(line)
                        n += 1
            out.flush()
            os.fsync(out.fileno())
        if n != num_samples:
            raise RuntimeError(f"merge: {n} samples in the parts, expected {num_samples}")
        os.replace(tmp, out_path)
        for p in parts:
            os.remove(p)
    D.barrier()
    return {"samples": num_samples, "rank_samples": len(idx), "seconds": elapsed, "out": out_path}


def sample_rank(cfg) -> dict:
    """One rank's share of the samples (any launcher); rank 0 writes the merged file."""
    D.init_distributed()
    setup_logging(cfg.stage_dir("sample"), D.rank())
    dev = D.device()
    model, meta = load_export(export_dir(cfg), dev)
    from .assets import load_tokenizer

    tok = load_tokenizer(tokenizer_ref(meta, cfg))
    settings = settings_from_cfg(cfg)
    out = cfg.sample.out or os.path.join(cfg.stage_dir("sample"), "samples.jsonl")
    log.info("sampling %d samples (kind %s, %s) on %d rank(s) -> %s", cfg.sample.num_samples, meta.get("kind"),
             settings.to_dict(), D.world_size(), out)
    summary = run_sampling(model, meta, tok, out, settings, cfg.sample.num_samples, cfg.sample.batch_size, dev,
                           show_progress=cfg.run.progress)
    log.info("rank %d: %d samples in %.2f s", D.rank(), summary["rank_samples"], summary["seconds"])
    return summary


def main(cfg) -> dict:
    from .components.ray_launch import run_stage

    return run_stage(cfg, sample_rank, "sample", cfg.sample.ray_workers)


if __name__ == "__main__":
    raise SystemExit(run_entry("sample", main))
