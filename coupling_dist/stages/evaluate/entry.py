"""``python -m coupling_dist.evaluate --config FILE [overrides]``: score samples by the domain's
metric (``domains``): text with a causal LM (this module), binary images by the Fréchet distance
in a classifier's features (``classifier_frechet.py``).

Text writes ``run.dir/eval/results.json``, ``results.csv`` and ``frontier.png`` (see
``evaluation.report``). Rows:
- ``file``: the sample file ``evaluate.samples`` (a path or glob; default
  ``run.dir/sample/samples.jsonl`` when it exists); bad lines are reported with line numbers and
  counted (``evaluation.samples_file``); a file without a single valid sample (empty, or every
  line bad) fails the evaluation (exit status 2, naming the file) before anything is scored, as
  does an evaluation that would score nothing at all;
- ``sweep`` (``evaluate.sweep``, needs the generator export): for every combination of
  ``evaluate.steps`` x ``latent_scales`` x ``top_ps`` x ``temperatures``, draw
  ``evaluate.num_samples`` samples (seed ``sample.seed``) and score them; the samples are kept
  under ``run.dir/eval/samples/``. K > 1 applies only to masked denoisers (skipped, and said so,
  for a one-step export);
- ``stage_a`` (``evaluate.stage_a_series``, needs the Stage A export): the same one-step settings
  for the Stage-A-only sampler (z -> inverse flow -> Stage A decoder), its own series;
- ``reference``: real held-out text: ``evaluate.reference`` when set, else the held-out split of
  the preprocessed shard set (tokens decoded with the data tokenizer);
- ``factorized`` (``evaluate.factorized_series``, needs the shards): every position drawn from the
  training data's per-position marginals (the barrier of the paper's Prop. 1,
  ``evaluation/factorized.py``), ``evaluate.num_samples`` samples.

Every row also carries the length statistics against the reference (``length_tv``, the TV distance
of the lengths before the first EOS; ``no_eos_fraction``) and is scored under
``evaluate.protocol`` (``evaluation.protocol``: what each protocol decodes and counts).

Scoring runs on a Ray actor pool (``evaluation.pool``): ``evaluate.num_actors`` CPU actors, or one
per GPU on a GPU cluster; ``ray.address`` selects an existing cluster.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import time

from ...components import paths as run_paths
from ...components.logging import get_logger, setup_logging
from ...components.preflight import InputError, check_export
from ...domains import build_domain
from ...evaluation import report
from ...evaluation.factorized import factorized_samples
from ...evaluation.protocol import length_stats, lengths, protocol_inputs
from ...evaluation.samples_file import SampleFile, read_reference_file, read_samples
from ...sampling import generate as G
from . import classifier_frechet

log = get_logger("evaluate")


def sample_paths(cfg) -> list[str]:
    spec = cfg.evaluate.samples
    if spec is None:
        default = run_paths.samples_file(cfg)
        return [default] if os.path.isfile(default) else []
    paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise InputError(f"evaluate.samples: no sample file at '{missing[0] if missing else spec}'; run "
                         f"`python -m coupling_dist.sample` first or fix evaluate.samples")
    return paths


def fill_gen_ids(sf: SampleFile, data_tok, max_tokens: int) -> None:
    """Records without generator ids (foreign files, plain-text references) get the data
    tokenizer's ids, cut at ``max_tokens`` like the generator's own sequences."""
    for r in sf.records:
        if r["ids"] is None:
            ids = list(data_tok(r["text"], add_special_tokens=False)["input_ids"])
            if len(ids) > max_tokens:
                ids = ids[:max_tokens]
                r["text"] = data_tok.decode(ids)
            r["ids"] = ids


def heldout_reference(cfg, data_tok, limit: int) -> SampleFile:
    """Real held-out text from the preprocessed shard set (tokens up to the first EOS, decoded)."""
    from ...data.loader import ShardLoader

    src = run_paths.data_dir(cfg)
    sf = SampleFile(os.path.join(src, "heldout"))
    loader = ShardLoader(src, "heldout", global_batch_size=1, seed=cfg.run.seed, rank=0, world=1,
                         fields=["tokens", "mask"])
    eos = int(data_tok.eos_token_id)
    n = min(limit, int(loader.steps_per_epoch))
    for i, batch in enumerate(loader):
        if i >= n:
            break
        toks, mask = batch["tokens"][0], batch["mask"][0]
        ids, _ = G.truncate_at_eos(toks[mask.bool()].tolist(), eos)
        sf.records.append({"line": None, "text": data_tok.decode(ids), "ids": ids, "index": i, "settings": None,
                           "eos": True})
    return sf


def reference_set(cfg, data_tok):
    e = cfg.evaluate
    if e.reference:
        if not os.path.isfile(e.reference):
            raise InputError(f"evaluate.reference: '{e.reference}' does not exist (a JSONL or text file of real text; "
                             f"unset it to use the held-out shards)")
        sf = read_reference_file(e.reference, e.max_text_chars)
        sf.records = sf.records[:e.reference_samples]
        fill_gen_ids(sf, data_tok, cfg.data.seq_len - 1)
        return sf, os.path.basename(e.reference)
    if os.path.isfile(os.path.join(run_paths.data_dir(cfg), "manifest.json")):
        return heldout_reference(cfg, data_tok, e.reference_samples), "heldout"
    log.warning("no held-out shards at %s and no evaluate.reference: the reference point is omitted",
                run_paths.data_dir(cfg))
    return None, None


def _score_row(pool, sf: SampleFile, scorer_tok, cfg, data_tok, ref_lengths=None, **cols) -> dict:
    texts, ids = protocol_inputs(sf.records, cfg.evaluate.protocol, data_tok, cfg.data.seq_len)
    m = pool.score(texts, ids, scorer_tok, cfg.evaluate.protocol, cfg.evaluate.batch_size)
    row = dict(cols)
    row.update(m)
    row.update(length_stats(sf.records, ref_lengths))
    row["bad_lines"] = len(sf.problems)
    return row


def _log_problems(sf: SampleFile) -> None:
    if sf.problems:
        log.warning("%s: %d bad line(s) left out of the scores:", sf.path, len(sf.problems))
        for p in sf.problems[:50]:
            log.warning("  %s line %d: %s", sf.path, p["line"], p["reason"])


def read_sample_file(path: str, max_chars: int) -> SampleFile:
    """Read and check one samples file. Bad lines are logged and counted (the rest is scored); a
    file with no valid sample at all is an ``InputError``: the evaluation fails (exit status 2)
    before scoring anything, and nothing is written or marked complete."""
    try:
        sf = read_samples(path, max_chars)
    except OSError as e:
        raise InputError(f"{path}: cannot read the samples file ({e.strerror or e})") from None
    _log_problems(sf)
    if not sf.records:
        if not sf.problems:
            why = "is empty"
        else:
            first = sf.problems[0]
            why = (f"has no valid sample: all {len(sf.problems)} line(s) are bad (line {first['line']}: "
                   f"{first['reason']})")
        raise InputError(f"{path} {why}; nothing was scored. Each line must be a JSON object with a 'text' string "
                         f"(re-run `python -m coupling_dist.sample`, or point evaluate.samples at a valid file)")
    return sf


def sweep_settings(cfg, kind: str):
    e = cfg.evaluate
    skipped = []
    for k, ls, tp, t in itertools.product(e.steps, e.latent_scales, e.top_ps, e.temperatures):
        if int(k) > 1 and kind != "masked":
            skipped.append(f"steps={k}: export kind '{kind}' has no few-step sampler")
            continue
        yield dict(steps=int(k), latent_scale=float(ls), top_p=float(tp), temperature=float(t)), None
    for s in sorted(set(skipped)):
        yield None, s


def run_sweep(cfg, pool, scorer_tok, out_dir: str, data_tok, ref_lengths) -> tuple[list[dict], list[str]]:
    """The sweep for the Stage B export, then (``evaluate.stage_a_series``) the same one-step
    settings for the Stage-A-only sampler (z -> inverse flow -> Stage A decoder), its own series."""
    from ...components import dist as D
    from ...components.assets import load_tokenizer
    from ...components.atomic import write_jsonl

    rows, notes = [], []
    for kind in ["generator"] + (["stage_a"] if cfg.evaluate.stage_a_series else []):
        path = run_paths.sampling_export(cfg, kind)
        what = "Stage A" if kind == "stage_a" else "generator"
        if not os.path.isfile(os.path.join(path, "config.json")):
            notes.append(f"no {what} export at {path}: {what} sweep skipped")
            continue
        check_export(path, f"{what} export", f"re-run {'stage_a' if kind == 'stage_a' else 'stage_b'} to re-export it, "
                     f"or set evaluate.sweep=false")
        dev = D.device()
        model, meta = G.load_export(path, dev, kind)
        tok = load_tokenizer(G.tokenizer_ref(meta, cfg))
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        for over, note in sweep_settings(cfg, meta.get("kind", "onestep")):
            if note:
                notes.append(note)
                continue
            settings = G.settings_from_cfg(cfg, **over)
            name = f"K{over['steps']}_s{over['latent_scale']:g}_p{over['top_p']:g}_t{over['temperature']:g}"
            name = f"stage_a_{name}" if kind == "stage_a" else name
            t0 = time.perf_counter()
            recs = G.generate_records(model, meta, tok, range(cfg.evaluate.num_samples), settings,
                                      batch_size=cfg.sample.batch_size, device=dev)
            dt = time.perf_counter() - t0
            write_jsonl(os.path.join(out_dir, "samples", f"{name}.jsonl"), recs)
            sf = SampleFile(name, records=recs)
            row = _score_row(pool, sf, scorer_tok, cfg, data_tok, ref_lengths, name=name,
                             kind="sweep" if kind == "generator" else "stage_a", sample_seconds=dt, **over)
            log.info("%s: Gen-PPL %.2f entropy %.3f %s, no-EOS %.2f, length TV %s", name, row["gen_ppl"],
                     row["entropy"], row["entropy_unit"], row["no_eos_fraction"] or 0.0, row["length_tv"])
            rows.append(row)
    return rows, notes


def main(cfg) -> dict:
    """The evaluation the domain's metric names (``domains``): Gen-PPL under a causal LM (text,
    below) or the classifier-space Fréchet distance (``classifier_frechet.py``)."""
    setup_logging(run_paths.stage_dir(cfg, "evaluate"), 0)
    domain = build_domain(cfg)
    return EVALUATORS[domain.metric](cfg, domain)


def evaluate_gen_ppl(cfg, domain=None) -> dict:
    from ...components.assets import load_tokenizer
    from ...evaluation.pool import ScorerPool

    out_dir = run_paths.stage_dir(cfg, "evaluate")
    e = cfg.evaluate
    paths = sample_paths(cfg)
    sample_files = [read_sample_file(p, e.max_text_chars) for p in paths]  # before anything is loaded
    scorer_tok = load_tokenizer(e.scorer)
    data_tok = load_tokenizer(cfg.data.tokenizer)
    rows, files, notes = [], [], []
    ref, ref_name = reference_set(cfg, data_tok)
    ref_lengths = lengths(ref.records) if ref is not None else None
    sweeps = [k for k in ["generator"] + (["stage_a"] if e.stage_a_series else [])
              if os.path.isfile(os.path.join(run_paths.sampling_export(cfg, k), "config.json"))] if e.sweep else []
    if not paths and not sweeps and not (ref is not None and ref.records):
        raise InputError(f"evaluate has nothing to score: no samples file ({run_paths.samples_file(cfg)} is absent and "
                         f"evaluate.samples is unset), no export to sweep (evaluate.sweep) and no reference text; "
                         f"run sample first or set evaluate.samples")
    with ScorerPool(e.scorer, e.num_actors, cfg.ray.address, cfg.ray.num_cpus_per_worker, cfg.ray.max_retries) as pool:
        for p, sf in zip(paths, sample_files):
            fill_gen_ids(sf, data_tok, cfg.data.seq_len)
            files.append(sf.summary())
            st = (sf.records[0].get("settings") or {})
            row = _score_row(pool, sf, scorer_tok, cfg, data_tok, ref_lengths, name=f"file:{os.path.basename(p)}",
                             kind="file",
                             **{k: st.get(k) for k in ("temperature", "latent_scale", "top_p", "steps")})
            log.info("%s: Gen-PPL %.2f entropy %.3f %s (%d texts, %d bad lines)", p, row["gen_ppl"], row["entropy"],
                     row["entropy_unit"], row["num_texts"], row["bad_lines"])
            rows.append(row)
        if e.sweep:
            sweep_rows, sweep_notes = run_sweep(cfg, pool, scorer_tok, out_dir, data_tok, ref_lengths)
            rows.extend(sweep_rows)
            notes.extend(sweep_notes)
        if e.factorized_series and os.path.isfile(os.path.join(run_paths.data_dir(cfg), "manifest.json")):
            fsf = factorized_samples(run_paths.data_dir(cfg), data_tok, e.num_samples, cfg.sample.seed,
                                     cfg.data.seq_len)
            row = _score_row(pool, fsf, scorer_tok, cfg, data_tok, ref_lengths, name="factorized", kind="factorized")
            log.info("factorized baseline: Gen-PPL %.2f entropy %.3f %s", row["gen_ppl"], row["entropy"],
                     row["entropy_unit"])
            rows.append(row)
        if ref is not None and ref.records:
            _log_problems(ref)
            row = _score_row(pool, ref, scorer_tok, cfg, data_tok, ref_lengths, name=ref_name, kind="reference")
            log.info("reference %s: Gen-PPL %.2f entropy %.3f %s", ref_name, row["gen_ppl"], row["entropy"],
                     row["entropy_unit"])
            rows.append(row)
        actors = pool.num_actors
    for n in notes:
        log.warning(n)
    if not rows:  # a safety net: the checks above refuse every known way to get here
        raise InputError(f"evaluate scored nothing ({'; '.join(notes) or 'no samples, sweep or reference'}); nothing "
                         f"written. Run sample first or set evaluate.samples")
    extra = {"scorer": e.scorer, "num_actors": actors, "sample_files": files, "notes": notes,
             "config": {"evaluate": cfg.to_dict()["evaluate"], "sample": cfg.to_dict()["sample"]}}
    paths_out = report.write_all(out_dir, rows, e.protocol, extra)
    log.info("wrote %s", json.dumps(paths_out))
    return {"rows": len(rows), **paths_out}



EVALUATORS = {"gen_ppl": evaluate_gen_ppl, "classifier_frechet": classifier_frechet.evaluate}
