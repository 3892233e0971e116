"""``python -m coupling_dist.classifier --config FILE [overrides]``: train the REWARD classifier of
classifier guidance and reward fine-tuning (the paper's §4.3: "a small classifier trained on the
domain's data") on the training shards' tokens and their ``label`` field, and write it to
``classifier.out`` (default ``run.dir/classifier/export``: ``model.safetensors`` +
``feature_net.json``, swapped in atomically; ``guidance.reward.load_reward`` reads it).

The network is the domain's classifier kind (``evaluation/feature_net.py``: ``digit2d`` for
binary images in raster order, ``seq1d`` for DNA) at ``classifier.width`` (default 64) with seed
``classifier.seed`` (default ``run.seed + 1``), trained ``classifier.steps`` AdamW steps with a
``classifier.soft_fraction`` of every batch fed softened one-hots (the reward scores relaxed
samples). It is kept apart from the evaluation classifier that ``evaluate`` trains
(``stages/evaluate/classifier_frechet.py``: width 32, seed ``run.seed``, one-hot inputs, its own
directory ``run.dir/eval/classifier``), so guided samples are never scored by the network they were
optimised against. Its accuracy on the shard set's held-out split is reported (on a seeded tenth of
the training items when the shard set has no held-out split).

One process, on CPU (bit-identical for the same shards and config). Launched with several ranks
(torchrun / srun), rank 0 trains and writes; the other ranks return at once without touching
anything, so the result is that of one process.
"""
from __future__ import annotations

import time

from ...components import dist as D
from ...components.logging import get_logger, setup_logging
from ...components.paths import reward_classifier, stage_dir
from ...components.preflight import PreflightError
from ...config import Config
from ...domains import build_domain
from ...evaluation.feature_net import accuracy, build_feature_net, save_feature_net, train_feature_net
from .preflight import check_domain, check_labels, check_shards, read_split

log = get_logger("classifier")
EVAL_WIDTH = 32  # the evaluation classifier's width (feature_net's default)


def classifier_seed(cfg: Config) -> int:
    return cfg.classifier.seed if cfg.classifier.seed is not None else cfg.run.seed + 1


def main(cfg: Config) -> dict:
    rank = D.launch_env()["rank"]
    if rank != 0:  # rank 0 trains and writes (module docstring)
        return {"rank": rank, "skipped": "rank 0 trains the classifier"}
    setup_logging(stage_dir(cfg, "classifier"), 0)
    c = cfg.classifier
    domain = build_domain(cfg)
    check_domain(cfg, domain)
    man = check_shards(cfg, domain)
    train, train_y = read_split(cfg, domain, "train")
    n_classes = check_labels(cfg, domain, train_y, "train")
    held, held_y = read_split(cfg, domain, "heldout")
    check_labels(cfg, domain, held_y, "heldout")
    seed = classifier_seed(cfg)
    if seed == cfg.run.seed and c.width == EVAL_WIDTH:
        log.warning("classifier.seed = run.seed and classifier.width = %d: the reward classifier has the evaluation "
                    "classifier's seed and shape; guided samples should be scored by a different network", EVAL_WIDTH)
    try:
        net = build_feature_net(domain.feature_net, n_classes, domain.vocab_size, train.shape[1], seed, c.width)
    except ValueError as e:  # e.g. seq1d's minimum length
        raise PreflightError(f"classifier: {e} (data.seq_len = {cfg.data.seq_len})") from None
    t0 = time.perf_counter()
    info = train_feature_net(net, train, train_y, steps=c.steps, seed=seed, batch_size=c.batch_size, lr=c.lr,
                             heldout_fraction=0.0 if len(held) else 0.1, soft_fraction=c.soft_fraction)
    if len(held):
        info.update(heldout_acc=accuracy(net, held, held_y), n_heldout=int(len(held)), heldout="heldout split")
    else:
        info["heldout"] = "a seeded tenth of the training items (the shard set has no held-out split)"
    info.update(role="reward", kind=domain.feature_net, domain=domain.name, n_classes=n_classes, width=c.width,
                seed=seed, batch_size=c.batch_size, lr=c.lr, soft_fraction=c.soft_fraction,
                shards=(man.extra or {}).get("fingerprint"), tokenizer_hash=(man.tokenizer or {}).get("hash"),
                order="domain.feature_tokens (binary_image: raster)", seconds=round(time.perf_counter() - t0, 1))
    out = save_feature_net(net, reward_classifier(cfg), info)
    log.info("reward classifier (%s, width %d, seed %d, %d steps) trained in %.0f s: held-out accuracy %.3f (%s); "
             "written to %s", domain.feature_net, c.width, seed, c.steps, info["seconds"], info["heldout_acc"],
             info["heldout"], out)
    return {"heldout_acc": info["heldout_acc"], "train_acc": info["train_acc"], "n_train": info["n_train"],
            "n_heldout": info["n_heldout"], "n_classes": n_classes, "out": out}
