"""DNA windows from the real Debian genome asset, and the DNA metrics (k-mer JS, GC, FBD)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from coupling_dist.data.genomes import (GenomeAssetError, decode_dna, dna_windows, encode_dna,
                                        genome_species, genome_asset_dir)
from coupling_dist.evaluation.dna_metrics import (dna_report, factorized_dna, gc_stats, js_divergence,
                                                  kmer_counts, kmer_distances)
from coupling_dist.evaluation.feature_net import build_feature_net, train_feature_net


@pytest.fixture(scope="module")
def genome_windows():
    try:
        genome_asset_dir()
    except GenomeAssetError as e:  # no apt-get / no Debian archive reachable: say why
        pytest.skip(f"the Debian package sibelia-examples cannot be fetched here: {e}")
    return dna_windows(length=500, max_windows=4000, seed=0)


@pytest.fixture(scope="module")
def split(genome_windows):
    """Non-overlapping windows: 3000 train, 1000 held-out, 1000 factorized from the train marginals."""
    windows, labels, names = genome_windows
    perm = np.random.default_rng(0).permutation(len(windows))
    train = [windows[i] for i in perm[:3000]]
    held = [windows[i] for i in perm[3000:]]
    return train, held, factorized_dna(train, 1000, seed=1)


def test_windows_deterministic_acgt_only(genome_windows):
    windows, labels, names = genome_windows
    again = dna_windows(length=500, max_windows=4000, seed=0)
    assert again[0] == windows and np.array_equal(again[1], labels) and again[2] == names
    assert dna_windows(length=500, max_windows=4000, seed=1)[0] != windows
    assert len(windows) == 4000 and {len(w) for w in windows} == {500}
    assert set("".join(windows)) == set("ACGT")
    assert len(names) == 7 and sorted(set(genome_species(names))) == ["Helicobacter pylori", "Staphylococcus aureus"]
    assert set(labels.tolist()) == set(range(7))
    # the full, non-overlapping set: every ACGT window of every complete genome (NCTC 8325 has one N)
    full, full_labels, _ = dna_windows(length=500)
    assert len(full) > 35000 and len(full) == len(full_labels)
    where = {w: lab for w, lab in zip(full, full_labels)}
    assert all(where.get(w) is not None for w in windows[::97])  # the subset is drawn from the full set


def test_encode_decode_and_errors():
    assert encode_dna(["ACGT", "TTAA"]).tolist() == [[0, 1, 2, 3], [3, 3, 0, 0]]
    assert decode_dna(encode_dna(["GATTACA"])) == ["GATTACA"]
    with pytest.raises(ValueError, match="DNA sequence 1 has 'N' at position 2"):
        encode_dna(["ACGT", "ACNT"])
    with pytest.raises(ValueError, match="sample sequence 1 has 'x' at position 0"):
        kmer_distances(["ACGT", "xCGT"], ["ACGT"])


def test_kmer_counts_and_js_match_brute_force():
    seqs = ["ACGTTGCAAC", "GGGACT", "TT"]
    for k in (1, 2, 3):
        brute = Counter(s[i:i + k] for s in seqs for i in range(len(s) - k + 1))
        counts = kmer_counts(seqs, k)
        for kmer, c in brute.items():
            idx = sum("ACGT".index(ch) * 4 ** (k - 1 - j) for j, ch in enumerate(kmer))
            assert counts[idx] == c
        assert counts.sum() == sum(brute.values())
    p, q = np.array([5, 1, 0, 4.0]), np.array([1, 1, 3, 5.0])
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-12)


def test_kmer_distance_ranks_factorized_below_held_out(split):
    train, held, fact = split
    assert all(v == 0.0 for v in kmer_distances(train, train).values())
    d_held, d_fact = kmer_distances(held, train), kmer_distances(fact, train)
    for k in range(2, 7):  # k = 1 is base composition, which the factorized model matches
        assert d_fact[k] > 3 * d_held[k], (k, d_fact[k], d_held[k])
    assert d_fact[1] < 1e-4


def test_factorized_matches_position_marginals(split):
    train, _, fact = split
    assert fact == factorized_dna(train, 1000, seed=1) and fact != factorized_dna(train, 1000, seed=2)
    ref = np.stack([np.bincount(col, minlength=4) for col in encode_dna(train).T]) / len(train)
    big = encode_dna(factorized_dna(train, 20000, seed=3))
    got = np.stack([np.bincount(col, minlength=4) for col in big.T]) / len(big)
    assert np.abs(got - ref).max() < 0.02  # 20k draws: std of a frequency <= 0.0035


def test_gc_stats(split):
    train, held, fact = split
    gc_train = np.array([(w.count("G") + w.count("C")) / 500 for w in train])
    s = gc_stats(held, train)
    assert s["reference_mean"] == pytest.approx(gc_train.mean()) and s["reference_std"] == pytest.approx(gc_train.std())
    assert 0.3 < s["reference_mean"] < 0.4  # S. aureus ~33% GC, H. pylori ~39%
    f = gc_stats(fact, train)
    # independent positions: GC per window is binomial-narrow, real windows vary far more
    assert f["sample_std"] < 0.6 * f["reference_std"] and f["wasserstein"] > 3 * s["wasserstein"]
    assert gc_stats(train, train)["wasserstein"] == 0.0


def test_classifier_and_fbd(genome_windows, split):
    windows, labels, names = genome_windows
    net = build_feature_net("seq1d", len(names), 4, 500)
    report = train_feature_net(net, encode_dna(windows), labels, steps=200, seed=0, batch_size=32)
    held = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:report["n_heldout"]].numpy()
    with torch.no_grad():
        pred = net(torch.as_tensor(encode_dna([windows[i] for i in held])).long()).argmax(1).numpy()
    majority = np.bincount(labels[held]).max() / len(held)
    species = np.array(genome_species(names))
    assert report["heldout_acc"] == pytest.approx((pred == labels[held]).mean())
    assert report["heldout_acc"] > majority  # strains of one species are near-identical: barely above
    assert (species[pred] == species[labels[held]]).mean() > 0.9  # ... but the species are told apart

    train, held_w, fact = split
    r_held, r_fact = dna_report(held_w, train, net), dna_report(fact, train, net)
    assert 0 < r_held["fbd"] < r_fact["fbd"] / 10
    assert r_held["kmer_js_mean"] < r_fact["kmer_js_mean"] and dna_report(held_w, train)["fbd"] is None


def test_missing_asset_names_the_package(monkeypatch, tmp_path):
    import coupling_dist.data.genomes as genomes

    monkeypatch.setenv("COUPLING_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(genomes, "SYSTEM_EXAMPLES", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
    with pytest.raises(GenomeAssetError, match="'apt-get' not found.*'sibelia-examples'"):
        genome_asset_dir()
    assert not (tmp_path / "cache" / "sibelia-examples").exists()  # nothing half-built is left
