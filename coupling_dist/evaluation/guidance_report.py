"""The guidance table and plots (the paper's Figure 4 and its table, §4.3), under run.dir/eval.

One row per (mechanism, setting): ``unconditional`` (G(z, null)), ``conditional`` (G(z, y), CFG
scale 1), ``cfg`` at each scale of ``evaluate.guidance.cfg_scales`` (Algorithm 4), ``classifier``
at each (K, eta) (Algorithm 5), ``finetune`` (the reward fine-tuned export, Algorithm 6), and the
masked denoiser's few-step rows when a masked export is given. Columns: the domain's Fréchet
distance (against the same training reference as the unguided table), class accuracy of the
*held-out evaluation* classifier on the requested labels (not the reward classifier: that one is
what the guidance optimises), the reward classifier's accuracy beside it, NFE (generator
evaluations per sample: 1 unguided / fine-tuned, 2 for CFG, K + 1 for classifier guidance, K
steps x 2 for the few-step denoiser under CFG) and seconds per 1,000 samples on this machine.

Outputs: ``guidance.csv``, ``guidance.md`` (the table the README quotes), ``guidance.json``,
``guidance_tradeoff.png`` (left: FD against accuracy, one curve per mechanism through its
strengths, Figure 4 right; right: FD and accuracy against the CFG scale).
"""
from __future__ import annotations

import math
import os

from ..components.atomic import write_path, write_text
from .report import write_csv, write_results

COLUMNS = ["name", "mechanism", "strength", "nfe", "num_samples", "fd_classifier", "accuracy", "reward_accuracy",
           "sec_per_1k"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], classifier: dict) -> str:
    lines = [f"Guidance on balanced labels. FD: Fréchet distance in the held-out evaluation classifier's features "
             f"({classifier.get('kind')}, accuracy {_fmt(classifier.get('accuracy_heldout_split'))} on the held-out "
             f"split); accuracy: that classifier's agreement with the requested label; reward_accuracy: the reward "
             f"classifier's (the one guidance optimises). NFE: generator evaluations per sample.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    marks = {"unconditional": "x", "conditional": "o", "cfg": "s", "classifier": "^", "finetune": "*",
             "fewstep_cfg": "D"}
    for mech in marks:
        pts = [r for r in rows if r["mechanism"] == mech and r.get("fd_classifier") is not None]
        if not pts:
            continue
        pts.sort(key=lambda r: r["strength"] if r.get("strength") is not None else 0.0)
        left.plot([r["accuracy"] for r in pts], [r["fd_classifier"] for r in pts], marker=marks[mech],
                  linestyle="-" if len(pts) > 1 else "none", label=mech)
        for r in pts:
            if r.get("strength") is not None and len(pts) > 1:
                left.annotate(f"{r['strength']:g}", (r["accuracy"], r["fd_classifier"]), fontsize=6,
                              textcoords="offset points", xytext=(3, 3))
    left.set_xlabel("class accuracy (held-out evaluation classifier)")
    left.set_ylabel("FD (classifier features)")
    left.set_yscale("log")
    left.set_title("quality vs guidance (labels: strength)", fontsize=9)
    left.legend(fontsize=7)
    cfg = sorted([r for r in rows if r["mechanism"] in ("cfg", "conditional", "unconditional")
                  and r.get("strength") is not None], key=lambda r: r["strength"])
    if cfg:
        s = [r["strength"] for r in cfg]
        right.plot(s, [r["fd_classifier"] for r in cfg], marker="s", color="C0", label="FD")
        right.set_yscale("log")
        right.set_xlabel("CFG scale s (0: unconditional, 1: conditional)")
        right.set_ylabel("FD (classifier features)", color="C0")
        twin = right.twinx()
        twin.plot(s, [r["accuracy"] for r in cfg], marker="o", color="C1", label="accuracy")
        twin.set_ylabel("class accuracy", color="C1")
        twin.set_ylim(0, 1.02)
        right.set_title("classifier-free guidance scale sweep", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "guidance_tradeoff.png")
    write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_all(out_dir: str, rows: list[dict], classifier: dict, extra: dict) -> dict:
    """Every guidance output; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    out = {"json": write_results(out_dir, {"rows": rows, "classifier": classifier, **extra}, name="guidance.json"),
           "csv": write_csv(out_dir, rows, COLUMNS, name="guidance.csv"), "md": os.path.join(out_dir, "guidance.md")}
    write_text(out["md"], table(rows, classifier))
    out["plot"] = plot(rows, out_dir)
    return out
