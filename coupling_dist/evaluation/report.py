"""Evaluation outputs: ``results.json``, ``results.csv`` and ``frontier.png`` under run.dir/eval.

The plot shows entropy (x) against Gen-PPL (y, log scale): our sweep points (one line per
(latent scale, top-p, K), annotated with the temperature), the sample file(s), the real-data
reference we measured, and — in grey, hollow, labelled "reported" — the published LM1B figures
from DESIGN.md §1 (the Coupling Models paper and its peers). Those are numbers copied from the
papers, not our measurements; the paper reports entropy in bits, so they are converted to nats
when our protocol is ``mdlm``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from ..components.atomic import write_path, write_with  # noqa: E402

# Published LM1B one-step figures (DESIGN.md §1), each with the entropy unit its source used; the
# plot converts each by its own unit. The Coupling Models paper's own points and its LM1B
# reference come from its released eval.py (log2: bits, over all 128 ids). The peers are copied
# in the paper's Table 6 from their papers, which follow the MDLM/DUO protocol (natural log: nats).
REPORTED_LM1B = [
    # (label, Gen-PPL, entropy, unit, source)
    ("Coupling (paper) τ=0.50", 45.82, 3.6088, "bits", "Coupling Models, Table 6"),
    ("Coupling (paper) τ=0.60", 76.19, 4.0841, "bits", "Coupling Models, Table 6"),
    ("Coupling (paper) τ=0.65", 98.96, 4.3192, "bits", "Coupling Models, Table 6"),
    ("LM1B test data (paper)", 47.47, 4.31, "bits", "Coupling Models, Table 6 / §G.3"),
    ("FMLM (reported)", 119.34, 4.16, "nats", "FMLM via Coupling Models Table 6 (MDLM/DUO protocol)"),
    ("DFM-ESD (reported)", 68.11, 3.79, "nats", "DFM via Coupling Models Table 6 (MDLM/DUO protocol)"),
]
_TO_NATS = {"nats": 1.0, "bits": math.log(2.0)}


def in_unit(value: float, unit: str, target: str) -> float:
    """Convert an entropy between bits and nats."""
    return value * _TO_NATS[unit] / _TO_NATS[target]


CSV_COLUMNS = ["name", "kind", "protocol", "temperature", "latent_scale", "top_p", "steps", "num_texts", "gen_ppl",
               "entropy", "entropy_unit", "mean_length", "mean_scorer_tokens", "distinct_1", "distinct_2",
               "distinct_3", "distinct_4", "no_eos_fraction", "length_tv", "mean_gen_length", "scored_tokens", "bad_lines",
               "sample_seconds", "score_seconds"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(out_dir: str, results: dict, name: str = "results.json") -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return _clean(o)

    write_with(path, lambda fh: json.dump(clean(results), fh, indent=2, sort_keys=True))
    return path


def write_csv(out_dir: str, rows: list[dict], columns: Optional[list] = None, name: str = "results.csv") -> str:
    path = os.path.join(out_dir, name)
    columns = columns or CSV_COLUMNS  # another metric's columns (stages/evaluate/classifier_frechet.py)

    def w(fh):
        wr = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: _clean(r.get(k)) for k in columns})

    write_with(path, w)
    return path


def plot_frontier(out_dir: str, rows: list[dict], protocol: str, title: Optional[str] = None) -> str:
    """rows: dicts with kind in {sweep, stage_a, file, factorized, reference}, gen_ppl, entropy, settings columns."""
    unit = "bits" if protocol == "paper" else "nats"
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    groups: dict = {}
    for r in rows:
        if r.get("kind") in ("sweep", "stage_a") and _finite(r):
            groups.setdefault((r["kind"], r.get("latent_scale"), r.get("top_p"), r.get("steps")), []).append(r)
    for (kind, ls, tp, k), pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pts = sorted(pts, key=lambda r: r["temperature"])
        who = "ours" if kind == "sweep" else "Stage A only (flow reverse)"
        ax.plot([p["entropy"] for p in pts], [p["gen_ppl"] for p in pts], "o-" if kind == "sweep" else "v--",
                label=f"{who}: s={ls}, top-p={tp}, K={k}")
        for p in pts:
            ax.annotate(f"τ={p['temperature']:g}", (p["entropy"], p["gen_ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    for r in rows:
        if r.get("kind") == "file" and _finite(r):
            ax.plot([r["entropy"]], [r["gen_ppl"]], "s", label=f"ours: {r['name']}")
        if r.get("kind") == "factorized" and _finite(r):
            ax.plot([r["entropy"]], [r["gen_ppl"]], "X", markersize=10, color="tab:red",
                    label="factorized baseline (per-position marginals, Prop. 1)")
        if r.get("kind") == "reference" and _finite(r):
            ax.plot([r["entropy"]], [r["gen_ppl"]], "*", markersize=14, color="black",
                    label=f"real held-out text (ours): {r['name']}")
    for label, ppl, ent, ent_unit, _ in REPORTED_LM1B:
        marker = "D" if "data" in label else "^"
        x = in_unit(ent, ent_unit, unit)
        ax.plot([x], [ppl], marker, markerfacecolor="none", color="grey", markersize=7)
        ax.annotate(label, (x, ppl), textcoords="offset points", xytext=(4, -9), fontsize=6, color="grey")
    ax.plot([], [], "^", markerfacecolor="none", color="grey",
            label=f"reported LM1B figures (papers, not our measurements; in {unit})")
    ax.set_yscale("log")
    ax.set_xlabel(f"unigram entropy per sample ({unit})")
    ax.set_ylabel("Gen-PPL (log scale)")
    ax.set_title(title or f"Entropy–Gen-PPL frontier (protocol: {protocol})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "frontier.png")
    write_path(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _finite(r: dict) -> bool:
    return all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) and r[k] > 0 for k in ("gen_ppl",)) \
        and isinstance(r.get("entropy"), (int, float)) and math.isfinite(r["entropy"])


def write_all(out_dir: str, rows: list[dict], protocol: str, extra: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    results = {"protocol": protocol, "rows": rows, "reported_lm1b": [
        {"label": lbl, "gen_ppl": p, "entropy": e, "entropy_unit": u, "source": f"{src} (published, not measured)"}
        for lbl, p, e, u, src in REPORTED_LM1B], **extra}
    return {"json": write_results(out_dir, results), "csv": write_csv(out_dir, rows),
            "png": plot_frontier(out_dir, rows, protocol)}
