"""Reward fine-tuning pre-flight, before any training: the generator export theta_0 exists, is
complete and class-conditional (Algorithm 6 feeds G the class y); the reward classifier exists
and reads what the generator writes (same sequence length, vocabulary and classes); ``finetune.tp``
divides the world size and the generator's heads / FFN; the global batch splits over the
data-parallel ranks. Every refusal is a ``PreflightError`` (exit status 2) naming the key and path.
``checked_task_info`` returns what the task needs (the export's arch and meta, the latent shape,
and the sha256 identities of theta_0 and of the reward that every checkpoint records).
"""
from __future__ import annotations

import os

from ...components.paths import finetune_reward, finetune_source
from ...components.preflight import PreflightError, safetensors_problem
from ...components.provenance import content_id
from ...config import Config

FIX_EXPORT = "run `python -m coupling_dist.stage_b` first, or point finetune.export at a generator export"
FIX_REWARD = "run `python -m coupling_dist.classifier --config FILE` first, or point finetune.reward at one"


def checked_task_info(cfg: Config, world: int) -> dict:
    ft = cfg.finetune
    tp = ft.tp
    if world % tp:
        raise PreflightError(f"finetune.tp = {tp} does not divide the world size {world} (DP = world / tp must be "
                             f"a whole number); choose a TP size that divides {world}")
    info = preflight(cfg)
    arch = info["arch"]
    if tp > 1:
        if arch["kind"] == "composite":
            raise PreflightError(f"finetune.tp = {tp}: {info['export']} is a composite generator, which runs at TP = 1 "
                                 f"only; use data parallelism (finetune.tp=1)")
        for name in ("heads", "ffn"):
            if int(arch[name]) % tp:
                raise PreflightError(f"finetune.tp = {tp} does not divide the generator's {name} ({arch[name]}) "
                                     f"recorded in {info['export']}/config.json")
        if int(info["meta"]["vocab_size"]) % tp:
            raise PreflightError(f"finetune.tp = {tp} does not divide the generator's head rows "
                                 f"({info['meta']['vocab_size']}) recorded in {info['export']}/config.json")
    dp = world // tp
    if ft.train.batch_size % dp:
        raise PreflightError(f"finetune.train.batch_size ({ft.train.batch_size}) must be divisible by the "
                             f"data-parallel size {dp} (world {world} / finetune.tp {tp})")
    return info


def read_source(cfg: Config) -> tuple[str, dict]:
    """(path, config.json dict) of theta_0, the generator export fine-tuning starts from."""
    from ...models.generator import read_export_config

    src = finetune_source(cfg)
    conf = os.path.join(src, "config.json")
    if not os.path.isfile(conf):
        raise PreflightError(f"finetune.export: no generator export at {src} ({conf} is missing); {FIX_EXPORT}")
    weights = os.path.join(src, "model.safetensors")
    why = "missing" if not os.path.isfile(weights) else safetensors_problem(weights)
    if why:
        raise PreflightError(f"finetune.export: generator export {src} is incomplete: {weights} is {why}; {FIX_EXPORT}")
    try:
        return src, read_export_config(src)
    except (OSError, ValueError) as e:
        raise PreflightError(f"finetune.export: {e}") from None


def preflight(cfg: Config) -> dict:
    src, conf = read_source(cfg)
    meta = dict(conf["meta"])
    classes = int(meta.get("num_classes") or 0)
    if classes <= 0:
        raise PreflightError(f"finetune.export: {src} is an unconditional generator (num_classes {classes} in its "
                             f"config.json); reward fine-tuning (Algorithm 6) conditions the generator on the class y. "
                             f"Train a class-conditional one (data.num_classes > 0) and fine-tune that")
    check_domain(cfg, meta, src)
    reward_dir = finetune_reward(cfg)
    if not os.path.isdir(reward_dir):
        raise PreflightError(f"finetune.reward: no reward classifier at {reward_dir}; {FIX_REWARD}")
    reward_info = check_reward(cfg, reward_dir, meta, src)
    patch = int(meta.get("patch", 1))
    seq_len = int(meta["seq_len"])
    return {"export": os.path.abspath(src), "arch": conf["arch"], "meta": meta, "num_classes": classes,
            "seq_len": seq_len, "positions": seq_len // patch, "latent_dim": int(meta["latent_dim"]),
            "reward": os.path.abspath(reward_info["dir"]), "reward_classes": reward_info["num_classes"],
            "export_sha256": content_id(src, "export")[0], "reward_sha256": content_id(reward_info["dir"], "export")[0]}


def check_domain(cfg: Config, meta: dict, src: str) -> None:
    """The export was made from this run's kind of data (``data.domain``, its token order): the
    reward classifier and the relaxation read the generator's rows in the domain's terms."""
    from ...domains import build_domain

    have = meta.get("tokenizer") or {}
    if not have.get("hash"):
        return
    want = build_domain(cfg).tokenizer_identity()
    if want.get("hash") and want["hash"] != have["hash"]:
        raise PreflightError(f"finetune.export: {src} was trained on {have.get('name')!r} data (hash {have['hash']}) but "
                             f"this config's data.domain {cfg.data.domain!r} makes {want.get('name')!r} (hash "
                             f"{want['hash']}); fine-tune with the config of the run that made the export")


def check_reward(cfg: Config, reward_dir: str, meta: dict, src: str) -> dict:
    """The reward classifier loads for this domain and reads what the generator writes (sequence
    length, vocabulary, the generator's classes), else a ``PreflightError`` naming ``finetune.reward``;
    returns its number of classes and the directory it was loaded from."""
    from ...components.preflight import InputError
    from ...domains import build_domain
    from ...guidance import reward as R

    domain = build_domain(cfg)
    try:
        reward = R.load_reward(reward_dir, domain, meta)
    except InputError as e:
        raise PreflightError(f"finetune.reward: {str(e).replace(R.FIX, FIX_REWARD)} (generator: {src})") from None
    classes = int(meta["num_classes"])
    if reward.n_classes != classes:
        raise PreflightError(f"finetune.reward: the classifier at {reward_dir} tells {reward.n_classes} classes but the "
                             f"generator {src} is conditioned on {classes} (num_classes); train the reward classifier "
                             f"on the generator's data")
    return {"num_classes": reward.n_classes, "dir": R.resolve_classifier_dir(reward_dir)}
