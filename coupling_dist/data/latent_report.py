"""Latent-matching statistics for the pair store (Prop. 3.1: the one-step error is bounded by the
decoder error plus the mismatch between the stored latents' marginal and N(0, I)).

Everything here is a pure function of arrays, so it can be tested on synthetic Gaussians.

Which marginal: latents are taken **per real position** (pads excluded), i.e. rows z[b, t, :] of
width d pooled over samples and positions. The headline KL fits a Gaussian with mean and *full*
d x d covariance to those rows and returns KL(N(mu, Sigma) || N(0, I)) in nats per position
(also per dim). A second, diagonal estimate per (position, channel) is reported too: it sees
position-dependent shifts/scales that pooling over positions would average away, but not
correlations.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


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
    """z [N, T, d] (one latent per row; multiplicity flattened into N), mask [N, T] (1 = real)."""
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
    fit = "mean + full covariance over per-position latent rows [d], real tokens only"
    if rows.shape[0] > d:
        kl = gaussian_fit_kl(rows)
        out["kl_gauss_fit"] = {"nats_per_position": kl, "nats_per_dim": kl / d, "fit": fit}
    else:  # a small store (or report_samples) at a wide latent: say so instead of failing the run
        out["kl_gauss_fit"] = {"nats_per_position": None, "nats_per_dim": None, "fit": fit,
                               "skipped": f"{rows.shape[0]} real positions <= latent_dim {d}"}
    # Per (position, channel): positions with too few real samples are skipped.
    cnt = m.sum(0)  # [T]
    ok = cnt >= 8
    if ok.any():
        zm = np.where(m[..., None], z, 0.0)
        pm = zm.sum(0)[ok] / cnt[ok, None]
        pv = (np.where(m[..., None], z, 0.0) ** 2).sum(0)[ok] / cnt[ok, None] - pm ** 2
        kd = diag_kl(pm, pv)
        out["kl_diag_position_channel"] = {"nats_per_dim": float(kd.mean()), "positions": int(ok.sum()),
                                           "fit": "independent N(mean, var) per (position, channel), real tokens only"}
    frac, n = ks_fail_fraction(rows, alpha)
    out["ks_fail_fraction"] = frac
    out["ks_dims_tested"] = n
    out["ks_what"] = "per channel, pooled over real positions"
    return out


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
    for key, label in (("recon_acc_heldout_from_u", "recon acc heldout (from u)"),
                       ("recon_acc_heldout_from_stored_z", "recon acc heldout (from stored z)"),
                       ("roundtrip_z_u_z_max_abs", "round trip z->u->z max |err|"),
                       ("roundtrip_u_z_u_max_abs", "round trip u->z->u max |err|")):
        if key in report:
            rows.append((label, f"{report[key]:.3g}"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows)
