"""The pair store's latent-matching report (``run.dir/pair_store/report.json``).

Latent-matching statistics for the pair store (Prop. 3.1: the one-step error is bounded by the
decoder error plus the mismatch between the stored latents' marginal and N(0, I)).

The statistics are pure functions of arrays, so they can be tested on synthetic Gaussians;
``build_report`` applies them to the written store and adds held-out reconstruction, round trips,
and a length probe (``length_probe``: can a linear classifier read the sequence length off z?).

Which marginal: latents are taken **per modelled position** -- every position under the paper's
design (``stage_a.pad_positions=encoded``), real tokens only under the "passthrough" ablation --
i.e. rows z[b, t, :] of width d pooled over samples and positions. The headline KL fits a Gaussian with mean and *full*
d x d covariance to those rows and returns KL(N(mu, Sigma) || N(0, I)) in nats per position
(also per dim). A second, diagonal estimate per (position, channel) is reported too: it sees
position-dependent shifts/scales that pooling over positions would average away, but not
correlations.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from ...components.atomic import write_json
from ...config import Config
from ...data.dtypes import from_stored
from ...data.shards import iter_shards
from ...data.vocab import CompactVocab
from ...models.stage_a import source_of_samples
from .writer import sample_labels, sample_noise


def gaussian_fit_kl(x: np.ndarray) -> float:
    """KL(N(mean, cov) || N(0, I)) for rows x [N, d] (full covariance; nats)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n <= d:
        raise ValueError(f"need more samples than dims for a full-covariance fit (got N={n}, d={d})")
    mu = x.mean(0)
    cov = np.cov(x, rowvar=False).reshape(d, d)
    sign, logdet = np.linalg.slogdet(cov)
    if sign <= 0:
        return math.inf
    return float(0.5 * (np.trace(cov) + mu @ mu - d - logdet))


def diag_kl(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Elementwise KL(N(mean, var) || N(0, 1))."""
    var = np.maximum(var, 1e-12)
    return 0.5 * (var + mean ** 2 - 1.0 - np.log(var))


def ks_fail_fraction(x: np.ndarray, alpha: float) -> tuple[float, int]:
    """Fraction of columns of x [N, d] whose one-sample KS test against N(0, 1) rejects at alpha."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    pvals = np.array([stats.kstest(x[:, j], "norm").pvalue for j in range(x.shape[1])])
    return float((pvals < alpha).mean()), int(x.shape[1])


def latent_stats(z: np.ndarray, mask: Optional[np.ndarray], alpha: float) -> dict:
    """z [N, T, d] (one latent per row; multiplicity flattened into N), mask [N, T] (1 = modelled
    position; None = all of them)."""
    z = np.asarray(z, dtype=np.float64)
    N, T, d = z.shape
    m = np.ones((N, T), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    rows = z[m]  # [N_real_positions, d]
    mean, std = rows.mean(0), rows.std(0)
    out = {
        "num_latents": int(N), "num_positions": int(rows.shape[0]), "latent_dim": int(d),
        "per_dim_mean": {"min": float(mean.min()), "max": float(mean.max()), "abs_mean": float(np.abs(mean).mean())},
        "per_dim_std": {"min": float(std.min()), "max": float(std.max()), "mean": float(std.mean())},
        "ks_alpha": alpha,
    }
    fit = "mean + full covariance over per-position latent rows [d], modelled positions (mask) only"
    if rows.shape[0] > d:
        kl = gaussian_fit_kl(rows)
        out["kl_gauss_fit"] = {"nats_per_position": kl, "nats_per_dim": kl / d, "fit": fit}
    else:  # a small store (or report_samples) at a wide latent: say so instead of failing the run
        out["kl_gauss_fit"] = {"nats_per_position": None, "nats_per_dim": None, "fit": fit,
                               "skipped": f"{rows.shape[0]} modelled positions <= latent_dim {d}"}
    # Per (position, channel): positions with too few real samples are skipped.
    cnt = m.sum(0)  # [T]
    ok = cnt >= 8
    if ok.any():
        zm = np.where(m[..., None], z, 0.0)
        pm = zm.sum(0)[ok] / cnt[ok, None]
        pv = (np.where(m[..., None], z, 0.0) ** 2).sum(0)[ok] / cnt[ok, None] - pm ** 2
        kd = diag_kl(pm, pv)
        out["kl_diag_position_channel"] = {"nats_per_dim": float(kd.mean()), "positions": int(ok.sum()),
                                           "fit": "independent N(mean, var) per (position, channel), modelled positions only"}
    frac, n = ks_fail_fraction(rows, alpha)
    out["ks_fail_fraction"] = frac
    out["ks_dims_tested"] = n
    out["ks_what"] = "per channel, pooled over the modelled positions"
    return out


def length_probe(z_train: np.ndarray, len_train: np.ndarray, z_test: np.ndarray, len_test: np.ndarray,
                 max_classes: int = 8, steps: int = 200, l2: float = 1e-3) -> dict:
    """How much z tells about the sequence length (the paper's Algorithm 1 puts it there).

    A multinomial logistic regression on the flattened latent and its square ([z, z^2] of
    [T * d] each: a linear probe that also sees variance differences, e.g. noise-like pads), fit
    on train latents (full-batch L-BFGS, L2 ``l2``) to predict the length, bucketed into at most
    ``max_classes`` quantile buckets of the train lengths; accuracy on held-out latents beside the
    majority-class baseline (the most frequent train bucket's share of the held-out set)."""
    edges = np.unique(np.quantile(len_train, np.linspace(0, 1, max_classes + 1)[1:-1]))
    ytr = torch.from_numpy(np.searchsorted(edges, len_train, side="right")).long()
    yte = torch.from_numpy(np.searchsorted(edges, len_test, side="right")).long()
    n_cls = int(max(ytr.max(), yte.max())) + 1

    def feats(z):
        f = torch.from_numpy(np.asarray(z, dtype=np.float32)).flatten(1)
        return torch.cat([f, f * f], 1)

    xtr, xte = feats(z_train), feats(z_test)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], n_cls)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=gen)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float((lin(xte).argmax(1) == yte).float().mean())
    majority = int(torch.bincount(ytr, minlength=n_cls).argmax())
    return {"accuracy": acc, "majority_baseline": float((yte == majority).float().mean()), "classes": n_cls,
            "train": int(len(ytr)), "test": int(len(yte)),
            "what": "multinomial logistic regression on [z, z^2] flattened, length in quantile buckets"}


def format_table(report: dict) -> str:
    """A short human-readable table of the report's headline numbers."""
    ls = report.get("latents", {})
    rows = [
        ("latents (positions)", f"{ls.get('num_latents', '?')} ({ls.get('num_positions', '?')})"),
        ("per-dim mean [min, max]", "[{min:+.3f}, {max:+.3f}]".format(**ls["per_dim_mean"]) if "per_dim_mean" in ls else "-"),
        ("per-dim std [min, max]", "[{min:.3f}, {max:.3f}]".format(**ls["per_dim_std"]) if "per_dim_std" in ls else "-"),
        ("KL Gaussian fit (nats/dim)", f"{ls['kl_gauss_fit']['nats_per_dim']:.4f}"
         if (ls.get("kl_gauss_fit") or {}).get("nats_per_dim") is not None else "-"),
        ("KL diag pos x chan (nats/dim)", f"{ls['kl_diag_position_channel']['nats_per_dim']:.4f}"
         if "kl_diag_position_channel" in ls else "-"),
        (f"KS fail fraction (alpha {ls.get('ks_alpha', '?')})",
         f"{ls['ks_fail_fraction']:.3f} of {ls['ks_dims_tested']}" if "ks_fail_fraction" in ls else "-"),
    ]
    lp = report.get("length_probe") or {}
    if "accuracy" in lp:
        rows.append(("length probe acc (majority)", f"{lp['accuracy']:.3f} ({lp['majority_baseline']:.3f})"))
    for key, label in (("recon_acc_heldout_from_u", "recon acc heldout (from u)"),
                       ("recon_acc_heldout_from_stored_z", "recon acc heldout (from stored z)"),
                       ("roundtrip_z_u_z_max_abs", "round trip z->u->z max |err|"),
                       ("roundtrip_u_z_u_max_abs", "round trip u->z->u max |err|")):
        if key in report:
            rows.append((label, f"{report[key]:.3g}"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows)


# ---------------------------------------------------------------------- the report of a written store


def _read_store(out_dir: str, split: str, limit: int, dtype: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    keys, zs, toks, masks = [], [], [], []
    for samples in iter_shards(out_dir, split):
        if len(keys) >= limit:
            break
        for smp in samples:
            if len(keys) >= limit:
                break
            keys.append(smp["__key__"])
            zs.append(from_stored(smp["z"], dtype).numpy())
            toks.append(smp["tokens"])
            masks.append(smp["mask"])
    if not keys:
        return [], np.zeros((0,)), np.zeros((0,)), np.zeros((0,))
    return keys, np.stack(zs), np.stack(toks), np.stack(masks)


def _predict(model, u: torch.Tensor, mask: torch.Tensor, vocab: Optional[CompactVocab] = None,
             rows: int = 1024) -> torch.Tensor:
    """argmax tokens [B, T] with the vocabulary head applied to ``rows`` positions at a time:
    ``model.decode`` materialises [B, T, V] logits, 5 GB in fp32 for a batch of 64 at T 128 and
    Qwen's V 151,936."""
    h = model.decoder_hidden(u, mask)
    flat = h.reshape(-1, h.shape[-1])
    ids = torch.cat([model.head(c).argmax(-1) for c in flat.split(rows)]).view(h.shape[:2])
    return ids if vocab is None else vocab.to_full(ids)  # a compact head's rows -> tokenizer ids


@torch.no_grad()
def build_report(cfg: Config, ctx: dict, model, features=None) -> dict:
    """``features``: the online frozen encoder for token-only source shards (None: stored features)."""
    ps, out_dir = cfg.pair_store, ctx["out_dir"]
    splits = sorted({e["split"] for e in ctx["plan"]})
    train_split = "train" if "train" in splits else splits[0]
    held = [s for s in splits if s != train_split]
    held_split = held[0] if held else train_split
    _, z, _, mask = _read_store(out_dir, train_split, ps.report_samples, ps.dtype)
    K = z.shape[1]
    # Under the paper's design every position is a modelled latent; the ablation models real ones only.
    scored = np.repeat(mask, K, axis=0) if model.cfg.pad_positions == "passthrough" else None
    report = {"split": train_split, "multiplicity": K, "dtype": ps.dtype,
              "latents": latent_stats(z.reshape(-1, *z.shape[2:]), scored, ps.ks_alpha)}
    if held_split != train_split:  # does z tell the length? (train z -> held-out z)
        _, hz_all, _, hmask = _read_store(out_dir, held_split, ps.report_samples, ps.dtype)
        if len(hz_all) >= 10:
            report["length_probe"] = length_probe(z[:, 0], mask.sum(1), hz_all[:, 0], hmask.sum(1))
    # Held-out reconstruction and round trips, on a bounded number of samples.
    n_rt = min(ps.report_samples, 256)
    src = []
    for samples in iter_shards(ctx["data_dir"], held_split):
        src += samples[:n_rt - len(src)]
        if len(src) >= n_rt:
            break
    hkeys, hz, _, _ = _read_store(out_dir, held_split, n_rt, ps.dtype)
    zmap = dict(zip(hkeys, hz)) if hkeys else {}
    dev = next(model.parameters()).device
    vocab = CompactVocab.from_meta(ctx["meta"].get("vocab"))
    correct = correct_z = total = 0
    rt_zuz = rt_uzu = 0.0
    for i in range(0, len(src), ps.batch_size):
        chunk = src[i:i + ps.batch_size]
        source = source_of_samples(model, chunk, vocab, dev, features)
        m = torch.from_numpy(np.stack([s["mask"] for s in chunk])).to(dev).bool()
        tok = torch.from_numpy(np.stack([s["tokens"] for s in chunk])).to(dev).long()
        T = model.latent_len(m.shape[1])
        eps = torch.stack([sample_noise(cfg.run.seed, s["__key__"], 1, T, model.latent_dim)[0] for s in chunk]).to(dev)
        u = model.encode_latent(source, m, eps)
        correct += int((_predict(model, u, m, vocab) == tok)[m].sum())
        total += int(m.sum())
        y = sample_labels(model, chunk, dev)  # a class-conditional flow: the stored z = NF(u; y)
        zf = model.to_gaussian(u, m, y)
        rt_uzu = max(rt_uzu, float((model.from_gaussian(zf, m, y) - u).abs().max()))
        if all(s["__key__"] in zmap for s in chunk):
            zs = torch.from_numpy(np.stack([zmap[s["__key__"]][0] for s in chunk])).to(dev)
            us = model.from_gaussian(zs, m, y)
            correct_z += int((_predict(model, us, m, vocab) == tok)[m].sum())
            rt_zuz = max(rt_zuz, float((model.to_gaussian(us, m, y) - zs).abs().max()))
    report.update({"heldout_split": held_split, "heldout_samples": len(src),
                   "recon_acc_heldout_from_u": correct / max(total, 1),
                   "recon_acc_heldout_from_stored_z": correct_z / max(total, 1) if zmap else None,
                   "roundtrip_z_u_z_max_abs": rt_zuz, "roundtrip_u_z_u_max_abs": rt_uzu,
                   "stage_a_artifact_sha256": ctx["artifact_hash"]})
    if report["recon_acc_heldout_from_stored_z"] is None:
        report.pop("recon_acc_heldout_from_stored_z")
    write_json(os.path.join(out_dir, "report.json"), report)
    return report
