"""``python -m coupling_dist.sample --config FILE [overrides]``: draw samples from the exported
generator (``run.dir/stage_b/export`` unless ``sample.export`` says otherwise; with
``sample.kind=stage_a`` from the Stage A export, z -> inverse flow -> Stage A decoder) and write
``run.dir/sample/samples.jsonl`` (or ``sample.out``): one JSON record per sample, in index order
(the record format and the sampler: ``sampling.generate``).

Multi-rank (torchrun / srun / Ray-actor ranks under ``ray job submit`` or with
``sample.ray_workers``): rank r draws the contiguous block r of the N sample indices. Each
sample's randomness is a function of (seed, index) (see ``sampling.onestep``), so the merged file
is the same for any number of ranks. Ranks write part files; rank 0 merges them in rank order into
the output (atomically: readers never see a partial file), then removes the parts.
"""
from __future__ import annotations

import json
import os
import time

from ...components import dist as D
from ...components.atomic import write_jsonl, write_with
from ...components.logging import get_logger, setup_logging
from ...components.paths import samples_file, sampling_export, stage_dir
from ...components.preflight import check_export
from ...domains import build_domain
from ...sampling.generate import generate_records, load_export, settings_from_cfg
from ...sampling.onestep import SampleSettings

log = get_logger("sample")


def rank_block(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def _merge(parts: list[str], out_path: str, num_samples: int) -> None:
    """Concatenate the rank parts (contiguous index blocks in rank order) into ``out_path``."""
    def write(out):
        n = 0
        for p in parts:
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    if rec["index"] != n:
                        raise RuntimeError(f"merge: {p} holds index {rec['index']}, expected {n}")
                    out.write(line)
                    n += 1
        if n != num_samples:
            raise RuntimeError(f"merge: {n} samples in the parts, expected {num_samples}")

    write_with(out_path, write)


def run_sampling(model, meta: dict, tok, out_path: str, settings: SampleSettings, num_samples: int,
                 batch_size: int, device="cpu", show_progress: bool = False, reward=None) -> dict:
    """Draw this rank's block, write its part, and (rank 0) merge the parts into ``out_path``."""
    r, w = D.rank(), D.world_size()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    idx = rank_block(num_samples, r, w)
    t0 = time.perf_counter()
    recs = generate_records(model, meta, tok, idx, settings, batch_size=batch_size, device=device,
                            show_progress=show_progress and r == 0, reward=reward)
    elapsed = time.perf_counter() - t0
    write_jsonl(f"{out_path}.part-{r:05d}-of-{w:05d}", recs)
    ok = D.all_ok(True)
    if r == 0 and ok:
        parts = [f"{out_path}.part-{i:05d}-of-{w:05d}" for i in range(w)]
        _merge(parts, out_path, num_samples)
        for p in parts:
            os.remove(p)
    D.barrier()
    return {"samples": num_samples, "rank_samples": len(idx), "seconds": elapsed, "out": out_path}


def check_input(cfg) -> str:
    """The export to sample from is there and complete (``InputError`` naming the file otherwise)."""
    path = sampling_export(cfg)
    if cfg.sample.kind == "stage_a":
        what, fix = "Stage A export", "run `python -m coupling_dist.stage_a` with this config, or set sample.export"
    else:
        what, fix = "generator export", "run `python -m coupling_dist.stage_b` with this config, or set sample.export"
    check_export(path, what, fix)
    if cfg.sample.guidance == "classifier":  # the reward classifier Algorithm 5 ascends must be there too
        from ...guidance.latent import latent_guidance_settings
        from ...guidance.reward import resolve_classifier_dir

        resolve_classifier_dir(latent_guidance_settings(cfg)["path"])
    return path


def sample_rank(cfg) -> dict:
    """One rank's share of the samples (any launcher); rank 0 writes the merged file."""
    D.init_distributed()
    setup_logging(stage_dir(cfg, "sample"), D.rank())
    dev = D.device()
    model, meta = load_export(check_input(cfg), dev, cfg.sample.kind)
    domain = build_domain(cfg)
    tok = domain.sample_codec(meta)  # text: the data tokenizer; other domains: their record codec
    settings = settings_from_cfg(cfg)
    reward = None
    if settings.guidance == "classifier":  # Algorithm 5's R: the reward classifier (python -m coupling_dist.classifier)
        from ...guidance.latent import latent_guidance_settings
        from ...guidance.reward import load_reward

        reward = load_reward(latent_guidance_settings(cfg)["path"], domain, meta, dev)
    out = samples_file(cfg)
    log.info("sampling %d samples (kind %s, %s) on %d rank(s) -> %s", cfg.sample.num_samples, meta.get("kind"),
             settings.to_dict(), D.world_size(), out)
    summary = run_sampling(model, meta, tok, out, settings, cfg.sample.num_samples, cfg.sample.batch_size, dev,
                           show_progress=cfg.run.progress, reward=reward)
    log.info("rank %d: %d samples in %.2f s", D.rank(), summary["rank_samples"], summary["seconds"])
    if D.rank() == 0:  # e.g. binary images: grid.png of the samples beside real.png
        pictures = domain.write_pictures(out, os.path.dirname(os.path.abspath(out)))
        if pictures:
            summary["pictures"] = pictures
            log.info("pictures: %s", ", ".join(pictures))
    return summary


def main(cfg) -> dict:
    from ...components.ray_launch import run_stage

    return run_stage(cfg, sample_rank, "sample", cfg.sample.ray_workers, preflight=lambda world: check_input(cfg))
