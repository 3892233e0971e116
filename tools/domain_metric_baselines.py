"""Reference figures of the image / DNA metrics: real held-out data vs the factorized baseline.

MNIST-Binary (the real 5k digits): a digit2d classifier is trained, then the Fréchet distance in its
features is measured train-vs-train (0), held-out-vs-train and factorized-vs-train. DNA (bacterial
genome windows, sibelia-examples): a seq1d classifier on genome labels (its accuracy beside the
majority class, and collapsed to species), then ``dna_report`` of held-out and factorized windows
against the training windows. Every figure is measured in this run; nothing is timed.

    python tools/domain_metric_baselines.py [--dna-windows 8000] [--steps 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from coupling_dist.data.genomes import dna_windows, encode_dna, genome_species
from coupling_dist.data.mnist import load_mnist_5k
from coupling_dist.evaluation.dna_metrics import dna_report, factorized_dna
from coupling_dist.evaluation.feature_net import build_feature_net, train_feature_net
from coupling_dist.evaluation.frechet import frechet_distance


def mnist_figures(steps: int, seed: int) -> dict:
    px, y = load_mnist_5k()
    perm = np.random.default_rng(seed).permutation(len(px))
    tr, ho = perm[:4000], perm[4000:]
    net = build_feature_net("digit2d", 10, 2, 784)
    fit = train_feature_net(net, px[tr], y[tr], steps=steps, seed=seed)
    fact = (np.random.default_rng(seed + 1).random((len(ho), 784)) < px[tr].mean(0)).astype(np.uint8)
    return dict(classifier=fit, fd_train_vs_train=frechet_distance(net, px[tr], px[tr]),
                fd_heldout=frechet_distance(net, px[tr], px[ho]), fd_factorized=frechet_distance(net, px[tr], fact))


def dna_figures(n_windows: int, steps: int, seed: int) -> dict:
    windows, labels, names = dna_windows(length=500, max_windows=n_windows, seed=seed)
    perm = np.random.default_rng(seed).permutation(len(windows))
    n_ho = len(windows) // 5
    tr, ho = perm[n_ho:], perm[:n_ho]
    train, held = [windows[i] for i in tr], [windows[i] for i in ho]
    net = build_feature_net("seq1d", len(names), 4, 500)
    fit = train_feature_net(net, encode_dna(train), labels[tr], steps=steps, seed=seed, batch_size=64)
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in torch.as_tensor(encode_dna(held)).long().split(512)]).numpy()
    species = np.array(genome_species(names))
    fact = factorized_dna(train, len(held), seed=seed + 1)
    return dict(genomes=names, classifier=fit, test_acc=float((pred == labels[ho]).mean()),
                test_majority=float(np.bincount(labels[ho]).max() / len(ho)),
                test_species_acc=float((species[pred] == species[labels[ho]]).mean()),
                heldout=dna_report(held, train, net), factorized=dna_report(fact, train, net))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dna-windows", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = dict(mnist=mnist_figures(a.steps, a.seed), dna=dna_figures(a.dna_windows, a.steps, a.seed))
    print(json.dumps(out, indent=2, default=float))
    m, d = out["mnist"], out["dna"]
    print(f"MNIST: classifier held-out acc {m['classifier']['heldout_acc']:.3f}; Fréchet(classifier) "
          f"held-out {m['fd_heldout']:.3f}, factorized {m['fd_factorized']:.3f} "
          f"(ratio {m['fd_factorized'] / m['fd_heldout']:.0f}x)")
    print(f"DNA: genome acc {d['test_acc']:.3f} (majority {d['test_majority']:.3f}), species acc "
          f"{d['test_species_acc']:.3f}; FBD held-out {d['heldout']['fbd']:.3f}, factorized "
          f"{d['factorized']['fbd']:.3f}; k-mer JS mean held-out {d['heldout']['kmer_js_mean']:.2e}, "
          f"factorized {d['factorized']['kmer_js_mean']:.2e}; GC W1 held-out {d['heldout']['gc']['wasserstein']:.4f}, "
          f"factorized {d['factorized']['gc']['wasserstein']:.4f}")


if __name__ == "__main__":
    main()
