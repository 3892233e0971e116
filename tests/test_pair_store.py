"""The pair store (issue 4), run as the real entry in real processes: 1 rank, 2 torchrun ranks and 2
Ray-actor ranks write the same bytes; a rank killed mid-run leaves no manifest and a re-run
completes the same store; a Stage A artifact made for other shards is refused before any work;
the latent-matching statistics tell N(0, I) from a shifted Gaussian; Stage B's loader reads the
store and resumes exactly. Inputs are tiny (64 samples, 8 source shards, an untrained Stage A)."""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from conftest import DEMO, run_module, torchrun
from coupling_dist.components import faults
from coupling_dist.data import shard_job
from coupling_dist.data import shards as S
from coupling_dist.stages.pair_store import writer as pw
from coupling_dist.stages.pair_store.report import gaussian_fit_kl, latent_stats
from pair_store_fixtures import export_random_stage_a, make_source, synthetic_tokenizer

T, H, V, D, K = 16, 16, 64, 8, 2
N_TRAIN, N_HELD, SHARD = 48, 16, 8  # 8 source shards = 8 work units (4 per rank at world 2)
ENTRY = "coupling_dist.pair_store"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_store")
    data = str(root / "data")
    make_source(data, n_train=N_TRAIN, n_heldout=N_HELD, shard_size=SHARD, T=T, H=H, V=V)
    art = export_random_stage_a(str(root / "stage_a_export"), data)
    return {"root": root, "data": data, "art": art}


def ps_args(world, run_dir, *extra, art=None) -> list[str]:
    return ["--config", DEMO, f"run.dir={run_dir}", f"data.out_dir={world['data']}",
            f"pair_store.artifact={art or world['art']}", f"pair_store.multiplicity={K}", "pair_store.batch_size=8",
            "pair_store.report_samples=64", "run.wandb.mode=disabled", "run.progress=false", *extra]


@pytest.fixture(scope="module")
def clean(world):
    """The reference store: one plain process."""
    run_dir = world["root"] / "clean"
    run_module(ENTRY, *ps_args(world, run_dir))
    return str(run_dir / "pair_store")


def shard_hashes(out_dir: str) -> dict:
    man = S.Manifest.load(out_dir)
    return {s["name"]: (s["split"], s["count"], s["sha256"]) for s in man.shards}


def contents(out_dir: str) -> dict:
    """{key: (split, z bytes, tokens bytes, mask bytes)} over every shard the manifest lists."""
    out = {}
    for s in S.Manifest.load(out_dir).shards:
        for smp in S.read_shard(os.path.join(out_dir, s["name"])):
            out[smp["__key__"]] = (s["split"], smp["z"].dtype.str, smp["z"].shape, smp["z"].tobytes(),
                                   smp["tokens"].tobytes(), smp["mask"].tobytes())
    return out


def completion(run_dir) -> dict:
    with open(os.path.join(str(run_dir), "pair_store", "_COMPLETE.json"), encoding="utf-8") as fh:
        return json.load(fh)["summary"]


def ranks_of(summary: dict) -> list[dict]:
    return sorted(summary["ranks"], key=lambda r: r["rank"])


# --------------------------------------------------------------------------- rank-count independence


def test_one_rank_store_holds_every_source_sample(world, clean):
    got = contents(clean)
    src = {}
    for s in S.Manifest.load(world["data"]).shards:
        for smp in S.read_shard(os.path.join(world["data"], s["name"])):
            src[smp["__key__"]] = (s["split"], smp["tokens"].tobytes(), smp["mask"].tobytes())
    assert sorted(got) == sorted(src) and len(got) == N_TRAIN + N_HELD
    for key, (split, dt, shape, zb, tb, mb) in got.items():
        assert (split, tb, mb) == src[key], key
        assert dt == "<f2" and shape == (K, T, D)
        assert np.isfinite(np.frombuffer(zb, np.float16)).all()
    # K latents of one sample use different noise, and samples differ from each other.
    z = np.frombuffer(got[f"{0:09d}"][3], np.float16).reshape(K, T, D)
    assert not np.array_equal(z[0], z[1])
    assert completion(os.path.dirname(clean))["ranks"][0]["written"] == 8


def test_two_torchrun_ranks_write_the_same_bytes_as_one(world, clean, tmp_path):
    torchrun(2, ["-m", ENTRY, *ps_args(world, tmp_path)])
    out = str(tmp_path / "pair_store")
    assert shard_hashes(out) == shard_hashes(clean)
    assert contents(out) == contents(clean)
    ranks = ranks_of(completion(tmp_path))
    assert [(r["rank"], r["units"], r["written"]) for r in ranks] == [(0, 4, 4), (1, 4, 4)]


def test_two_ray_actor_ranks_write_the_same_bytes_as_one(world, clean, tmp_path):
    run_module(ENTRY, *ps_args(world, tmp_path, "pair_store.ray_workers=2"))
    out = str(tmp_path / "pair_store")
    assert shard_hashes(out) == shard_hashes(clean)
    assert contents(out) == contents(clean)
    summary = completion(tmp_path)
    assert summary["launcher"] == "ray" and summary["ray_workers"] == 2
    assert [(r["rank"], r["written"]) for r in ranks_of(summary)] == [(0, 4), (1, 4)]


# --------------------------------------------------------------------------- a rank dies


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_killed_rank_leaves_no_manifest_and_rerun_matches_clean(world, clean, tmp_path, launcher):
    out = str(tmp_path / "pair_store")
    fault = {faults.ENV: faults.spec("pair_store.unit", rank=1, done=1)}  # rank 1 SIGKILLs itself after its first unit
    if launcher == "torchrun":
        proc = torchrun(2, ["-m", ENTRY, *ps_args(world, tmp_path)], env=fault, check=False)
    else:
        proc = run_module(ENTRY, *ps_args(world, tmp_path, "pair_store.ray_workers=2"), env=fault, check=False)
        assert "error (pair_store, rank 1): Ray worker died" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not os.path.exists(os.path.join(out, "report.json"))
    assert not os.path.exists(os.path.join(out, "_COMPLETE.json"))
    plan = sorted(s["name"] for s in S.Manifest.load(world["data"]).shards)
    recorded = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, shard_job.PARTS, "*.json")))
    assert [n for n in recorded if n in plan[1::2]] == [plan[1]]  # rank 1 died after exactly one unit
    assert len(recorded) < len(plan)
    assert not glob.glob(os.path.join(out, ".*.tmp.*"))  # killed between units: no half-written file
    # A finished shard damaged after the crash (size no longer matches its record) is redone, not trusted.
    victim = os.path.join(out, plan[1])
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)

    run_module(ENTRY, *ps_args(world, tmp_path))  # re-run on one rank: the rank count may change too
    assert shard_hashes(out) == shard_hashes(clean)
    assert contents(out) == contents(clean)
    (r,) = completion(tmp_path)["ranks"]
    assert r["skipped"] == len(recorded) - 1 and r["written"] == len(plan) - r["skipped"]


# --------------------------------------------------------------------------- pre-flight refusal


@pytest.mark.parametrize("what", ["tokenizer", "seq_len", "width", "tokenizer-ray", "encoder-hash", "encoder-layer"])
def test_mismatched_stage_a_artifact_is_refused_before_any_work(world, tmp_path, what):
    other_tok = ({"tokenizer": synthetic_tokenizer(V, "othertok")}, ["artifact 'othertok-64'", "shards 'synthetic-64'"])
    kw, expect = {
        "tokenizer": other_tok, "tokenizer-ray": other_tok,
        "seq_len": ({"seq_len": 2 * T}, [f"seq_len: artifact {2 * T} vs shards {T}"]),
        "width": ({"feature_dim": 2 * H}, [f"feature width: artifact {2 * H} vs shards {H}"]),
        # same width, another encoder (or another layer of it): the latents would be silently wrong
        "encoder-hash": ({"encoder": {"name": "other-encoder", "hash": "h-other"}},
                         ["encoder: artifact 'other-encoder' (hash 'h-other')", f"shards 'synthetic-encoder' (hash 'h{H}')",
                          "differing: hash", "re-export Stage A"]),
        "encoder-layer": ({"encoder": {"layer": 3, "pad_features": "zeroed"}},
                          ["encoder: artifact 'synthetic-encoder' (hash", "layer 3, pad_features 'zeroed')",
                           "layer None, pad_features None)", "differing: layer, pad_features"]),
    }[what]
    art = export_random_stage_a(str(tmp_path / "bad_export"), world["data"], **kw)
    extra = ["pair_store.ray_workers=2"] if what.endswith("ray") else []
    proc = run_module(ENTRY, *ps_args(world, tmp_path / "run", *extra, art=art), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert msg and "does not match the source shards" in msg[0], proc.stderr[-3000:]
    for piece in expect:
        assert piece in msg[0], (piece, msg[0])
    assert art in msg[0] and os.path.join(world["data"], "manifest.json") in msg[0]
    # Nothing was written: no shard, no unit record, no manifest (and no Ray instance was started).
    out = tmp_path / "run" / "pair_store"
    assert not glob.glob(str(out / "*.tar")) and not glob.glob(str(out / shard_job.PARTS / "*"))
    assert not (out / "manifest.json").exists()
    assert "Ray workers" not in proc.stderr


# --------------------------------------------------------------------------- latent statistics


def _masked(rng, N: int, T_: int) -> np.ndarray:
    lengths = rng.integers(2, T_ + 1, N)
    return (np.arange(T_)[None] < lengths[:, None]).astype(np.uint8)


def test_latent_stats_tell_standard_gaussian_from_shifted_one():
    rng = np.random.default_rng(0)
    N, T_, d, alpha = 1500, 12, 8, 0.01
    mask = _masked(rng, N, T_)
    z0 = rng.standard_normal((N, T_, d))
    z0[mask == 0] = 50.0  # pads must not count: they would dominate every statistic
    mu, sd = 0.3, 1.3
    z1 = mu + sd * rng.standard_normal((N, T_, d))
    s0, s1 = latent_stats(z0, mask, alpha), latent_stats(z1, mask, alpha)
    analytic = 0.5 * (sd ** 2 + mu ** 2 - 1.0 - math.log(sd ** 2))  # KL per dim
    assert s0["num_positions"] == int(mask.sum()) and s0["latent_dim"] == d
    assert 0 <= s0["kl_gauss_fit"]["nats_per_dim"] < 0.005
    assert abs(s1["kl_gauss_fit"]["nats_per_dim"] - analytic) < 0.1 * analytic
    assert s0["kl_diag_position_channel"]["nats_per_dim"] < 0.02
    assert s1["kl_diag_position_channel"]["nats_per_dim"] > 0.5 * analytic
    assert s0["ks_fail_fraction"] <= 1 / d and s1["ks_fail_fraction"] == 1.0
    assert abs(s0["per_dim_mean"]["abs_mean"]) < 0.05 and abs(s1["per_dim_std"]["mean"] - sd) < 0.05


def test_gaussian_fit_kl_sees_correlations_and_reports_too_few_rows():
    rng = np.random.default_rng(1)
    d = 4
    A = np.eye(d) + 0.6 * np.tril(np.ones((d, d)), -1)
    cov = A @ A.T
    x = rng.standard_normal((40000, d)) @ A.T  # mean 0, per-dim variances != 1, correlated
    analytic = 0.5 * (np.trace(cov) - d - np.linalg.slogdet(cov)[1])
    assert abs(gaussian_fit_kl(x) - analytic) < 0.05 * analytic
    # Whitened (same marginal variances as N(0, I) per dim after scaling) -> ~0.
    assert gaussian_fit_kl(rng.standard_normal((40000, d))) < 0.002
    few = latent_stats(rng.standard_normal((1, 3, 16)), None, 0.01)  # 3 positions, 16 dims
    assert few["kl_gauss_fit"]["nats_per_dim"] is None and "skipped" in few["kl_gauss_fit"]


# --------------------------------------------------------------------------- Stage B reads it


def test_stage_b_loader_reads_the_store_and_resumes_exactly(clean):
    import torch

    from coupling_dist.data.loader import ShardLoader

    def loader(**kw):
        return ShardLoader(clean, "train", 8, seed=3, rank=0, world=1, fields=["z", "tokens", "mask"],
                           with_keys=True, **kw)

    full = list(loader())
    assert len(full) == N_TRAIN // 8
    b = full[0]
    assert b["z"].shape == (8, K, T, D) and b["z"].dtype == torch.float16
    assert b["tokens"].dtype == torch.int32 and b["mask"].shape == (8, T)
    store = contents(clean)
    for i, key in enumerate(b["__key__"]):
        assert b["z"][i].numpy().tobytes() == store[key][3] and b["tokens"][i].numpy().tobytes() == store[key][4]
    assert sorted(k for x in full for k in x["__key__"]) == sorted(k for k, v in store.items() if v[0] == "train")
    s = 2
    first = loader()
    it = iter(first)
    [next(it) for _ in range(s)]
    state = first.state_dict()
    resumed = loader(start_step=s)
    from_state = loader()
    from_state.load_state_dict(state)
    for x, y, w in zip(full[s:], list(resumed), list(from_state)):
        assert x["__key__"] == y["__key__"] == w["__key__"]
        assert all(torch.equal(x[f], y[f]) and torch.equal(x[f], w[f]) for f in ("z", "tokens", "mask"))


# --------------------------------------------------------------------------- report + manifest


def test_report_and_manifest_after_a_run(world, clean):
    from coupling_dist.models.stage_a_export import artifact_hash

    with open(os.path.join(clean, "report.json"), encoding="utf-8") as fh:
        rep = json.load(fh)
    assert set(rep) == {"split", "multiplicity", "dtype", "latents", "heldout_split", "heldout_samples",
                        "recon_acc_heldout_from_u", "recon_acc_heldout_from_stored_z", "roundtrip_z_u_z_max_abs",
                        "roundtrip_u_z_u_max_abs", "stage_a_artifact_sha256", "length_probe"}
    lat = rep["latents"]
    assert {"num_latents", "num_positions", "latent_dim", "per_dim_mean", "per_dim_std", "ks_alpha", "kl_gauss_fit",
            "kl_diag_position_channel", "ks_fail_fraction", "ks_dims_tested"} <= set(lat)
    assert (rep["split"], rep["heldout_split"], rep["multiplicity"], rep["dtype"]) == ("train", "heldout", K, "float16")
    assert rep["heldout_samples"] == N_HELD and rep["stage_a_artifact_sha256"] == artifact_hash(world["art"])
    # The report's statistics are those of the stored train latents (all K per sample, all T positions:
    # every position is a modelled latent under the paper's design).
    z = np.stack([np.frombuffer(v[3], np.float16).reshape(K, T, D) for k, v in sorted(contents(clean).items())
                  if v[0] == "train"])
    m = np.stack([np.frombuffer(v[5], np.uint8) for k, v in sorted(contents(clean).items()) if v[0] == "train"])
    ref = latent_stats(z.reshape(-1, T, D).astype(np.float32), None, rep["latents"]["ks_alpha"])
    assert lat["num_latents"] == N_TRAIN * K and lat["num_positions"] == ref["num_positions"] == K * N_TRAIN * T
    lp = rep["length_probe"]
    assert lp["test"] == N_HELD and 0 <= lp["majority_baseline"] <= 1 and 0 <= lp["accuracy"] <= 1
    assert lat["kl_gauss_fit"]["nats_per_dim"] == pytest.approx(ref["kl_gauss_fit"]["nats_per_dim"], rel=1e-6)
    assert lat["kl_gauss_fit"]["nats_per_dim"] > 0  # an untrained flow is not N(0, I)
    assert 0 <= rep["recon_acc_heldout_from_u"] <= 1 and 0 <= rep["recon_acc_heldout_from_stored_z"] <= 1
    assert rep["roundtrip_u_z_u_max_abs"] < 1e-3 and rep["roundtrip_z_u_z_max_abs"] < 1e-3
    # Held-out reconstruction recomputed here with the full-logits decode (the report chunks the head).
    import torch

    from coupling_dist.models.stage_a_export import load_stage_a

    model, _ = load_stage_a(world["art"])
    held = [smp for s in S.Manifest.load(world["data"]).split_shards("heldout")
            for smp in S.read_shard(os.path.join(world["data"], s["name"]))]
    feats = torch.from_numpy(np.stack([s["features"] for s in held]))
    m_h = torch.from_numpy(np.stack([s["mask"] for s in held])).bool()
    tok = torch.from_numpy(np.stack([s["tokens"] for s in held])).long()
    eps = torch.stack([pw.sample_noise(0, s["__key__"], 1, T, D)[0] for s in held])  # run.seed 0 (demo)
    with torch.no_grad():
        pred = model.decode(model.encode_latent(feats, m_h, eps), m_h).argmax(-1)
    assert rep["recon_acc_heldout_from_u"] == pytest.approx(int((pred == tok)[m_h].sum()) / int(m_h.sum()), abs=1e-12)
    man = S.Manifest.load(clean)
    assert man.kind == "pair_store" and man.fields["z"] == {"dtype": "float16", "shape": [K, T, D]}
    assert man.extra["stage_a_artifact"]["sha256"] == artifact_hash(world["art"])
    assert man.splits == {"train": N_TRAIN, "heldout": N_HELD} and not man.verify(clean, checksums=True)
