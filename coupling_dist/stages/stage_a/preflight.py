"""Stage A pre-flight: the preprocessed shard set exists, holds encoder features of the width this
config's encoder produces, made by that encoder and tokenized with ``data.tokenizer`` -- or, under
``stage_a.online_encoder``, holds tokens only and records that very encoder (model, layer, dtype)
for the features Stage A computes; any mismatch raises ``PreflightError`` (exit status 2) before
training."""
from __future__ import annotations

import os

from ...components import assets
from ...components.paths import data_dir
from ...components.preflight import PreflightError, require_file, require_labels
from ...config import Config
from ...data.shards import Manifest
from ...data.source import PAD_FEATURES, check_feature_source, check_online_encoder, describe_source
from .task import StageATask


def preflight(cfg: Config) -> StageATask:
    """Build the task, refusing shards that do not fit this config."""
    src = data_dir(cfg)
    manifest = os.path.join(src, "manifest.json")
    require_file(manifest, "run `python -m coupling_dist.preprocess` first (or set data.out_dir to an existing "
                           "shard set)")
    try:
        man = Manifest.load(src)
        require_labels(man.fields, manifest, cfg.data.num_classes)
        info = describe_source(man, src)
        check_feature_source(cfg.stage_a.online_encoder, info, src)
        if info["online_features"]:
            check_online_encoder(cfg.encoder, info, src)
        task = StageATask.from_data(cfg, src)
    except (KeyError, ValueError) as e:
        raise PreflightError(str(e)) from None
    enc = task.meta.get("encoder") or {}
    if enc.get("name") and cfg.stage_a.pad_positions == "encoded" and enc.get("pad_features") != PAD_FEATURES:
        raise PreflightError(f"{manifest}: these features were made with pad positions zeroed (an older "
                             f"preprocess); stage_a.pad_positions=encoded needs the LM's features at pads: "
                             f"rerun preprocess into a new data.out_dir")
    if cfg.encoder.model is not None:
        want = assets.identity(cfg.encoder.model)
        if enc.get("hash") and want["hash"] and enc["hash"] != want["hash"]:
            raise PreflightError(f"{manifest}: features were made by encoder {enc.get('name')!r} (hash {enc['hash']}) "
                                 f"but encoder.model is {cfg.encoder.model!r} (hash {want['hash']}); rerun preprocess")
        hidden = _encoder_width(cfg.encoder.model)
        if hidden is not None and hidden != task.feature_dim:
            raise PreflightError(f"{manifest}: field 'features' has width {task.feature_dim} but encoder "
                                 f"{cfg.encoder.model!r} has hidden size {hidden}; rerun preprocess")
    return task


def _encoder_width(ref: str):
    try:
        conf = assets.load_config(ref)
    except (OSError, ValueError):  # no loadable config (e.g. hub id offline): the manifest check stands
        return None
    return getattr(conf, "hidden_size", None)
