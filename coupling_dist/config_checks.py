"""The rules between config keys, checked by ``config.load_config`` after every field passed its
own type and range check (``config.py`` holds the schema: the sections, their fields and bounds).
Each rule raises a ``ConfigError`` naming the keys involved, before any stage does work."""
from __future__ import annotations

from .config import ALL_STAGES, Config, ConfigError, TrainConfig


def cross_checks(cfg: Config, where: str) -> None:
    """Refuse combinations of keys that each pass their own field's check (``ConfigError`` naming
    the keys and ``where``: the file, and whether overrides were applied)."""
    a = cfg.stage_a
    fl = a.flow
    if fl.conditioner == "mlp":
        if fl.kind != "realnvp":
            raise ConfigError(f"{where}: 'stage_a.flow.conditioner: mlp' is a RealNVP conditioner; "
                              f"'stage_a.flow.kind' is {fl.kind!r}")
        if cfg.data.seq_len % a.patch == 0 and fl.positions != cfg.data.seq_len // a.patch:
            raise ConfigError(f"{where}: 'stage_a.flow.positions' ({fl.positions}) must be 'data.seq_len' / "
                              f"'stage_a.patch' = {cfg.data.seq_len // a.patch} (the latent positions the "
                              f"mlp conditioner sees; leave it out to derive it)")
    elif a.flow.hidden % a.flow.heads:
        raise ConfigError(f"{where}: 'stage_a.flow.hidden' ({a.flow.hidden}) must be divisible by 'stage_a.flow.heads' ({a.flow.heads})")
    if a.latent_dim < 2:
        raise ConfigError(f"{where}: 'stage_a.latent_dim' must be >= 2 for channel-split couplings")
    if a.online_encoder and cfg.encoder.model is None:
        raise ConfigError(f"{where}: 'stage_a.online_encoder' is true but 'encoder.model' is null: the online "
                          f"encoder is the frozen encoder.model (set it, or online_encoder: false for the "
                          f"token-embedding encoder)")
    if a.decoder.width % a.decoder.heads:
        raise ConfigError(f"{where}: 'stage_a.decoder.width' must be divisible by 'stage_a.decoder.heads'")
    m = cfg.stage_b.model
    if m.width % m.heads:
        raise ConfigError(f"{where}: 'stage_b.model.width' ({m.width}) must be divisible by 'stage_b.model.heads' ({m.heads})")
    tp = cfg.stage_b.tp
    for name, val in (("heads", m.heads), ("ffn", m.ffn)):
        if val % tp:
            raise ConfigError(f"{where}: 'stage_b.model.{name}' ({val}) must be divisible by 'stage_b.tp' ({tp})")
    for sec in ("stage_a", "stage_b", "finetune"):
        t: TrainConfig = getattr(cfg, sec).train
        if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
            raise ConfigError(f"{where}: '{sec}.train.betas' must be two numbers in [0, 1)")
        if t.warmup_steps > t.steps:
            raise ConfigError(f"{where}: '{sec}.train.warmup_steps' ({t.warmup_steps}) exceeds '{sec}.train.steps' ({t.steps})")
    k = a.patch
    if k > 1:
        if cfg.data.seq_len % k:
            raise ConfigError(f"{where}: 'stage_a.patch' ({k}) must divide 'data.seq_len' ({cfg.data.seq_len})")
        if a.pad_positions != "encoded":
            raise ConfigError(f"{where}: 'stage_a.patch' > 1 needs 'stage_a.pad_positions: encoded' (a latent position "
                              f"covers {k} tokens, so it cannot pass pads through one by one)")
        if m.kind == "masked":
            raise ConfigError(f"{where}: 'stage_b.model.kind: masked' reads x_t per token; it does not support "
                              f"'stage_a.patch' > 1 (use onestep or composite)")
    d = cfg.data
    if d.label_field is not None and (d.domain != "text" or d.format == "text"):
        raise ConfigError(f"{where}: 'data.label_field' = {d.label_field!r} names a label column of JSONL / Parquet "
                          f"text corpora; data.domain {d.domain} with data.format {d.format} has none "
                          f"(binary_image and dna read their labels from their corpus)")
    if d.label_field is not None and d.label_field == d.text_field:
        raise ConfigError(f"{where}: 'data.label_field' and 'data.text_field' are both {d.text_field!r}")
    conditioning_checks(cfg, where)
    bad = [s for s in cfg.pipeline.stages if s not in ALL_STAGES]
    if bad:
        raise ConfigError(f"{where}: 'pipeline.stages' has unknown stage {bad[0]!r} (stages: {list(ALL_STAGES)})")
    order = [ALL_STAGES.index(s) for s in cfg.pipeline.stages]
    if order != sorted(order):
        raise ConfigError(f"{where}: 'pipeline.stages' = {cfg.pipeline.stages} is out of order (the order is "
                          f"{list(ALL_STAGES)})")
    if not isinstance(cfg.data.corpus, (str, list)) or (isinstance(cfg.data.corpus, list) and not all(isinstance(c, str) for c in cfg.data.corpus)):
        raise ConfigError(f"{where}: 'data.corpus' must be a path, a glob or a list of them")


def conditioning_checks(cfg: Config, where: str) -> None:
    """The class-conditional keys: data.num_classes against the flow kind and the sample section."""
    n, s = cfg.data.num_classes, cfg.sample
    if n and cfg.stage_a.flow.kind != "realnvp":
        raise ConfigError(f"{where}: 'data.num_classes' = {n} needs 'stage_a.flow.kind: realnvp' (the class-conditional "
                          f"flow is built for RealNVP couplings; TarFlow is unconditional only)")
    if not n and (s.guidance != "none" or s.label >= 0):
        what = f"'sample.guidance' = {s.guidance!r}" if s.guidance != "none" else f"'sample.label' = {s.label}"
        raise ConfigError(f"{where}: {what} needs a class-conditional run ('data.num_classes' > 0, got 0)")
    if n and s.label >= n:
        raise ConfigError(f"{where}: 'sample.label' = {s.label} must be < 'data.num_classes' ({n}) (or -1: balanced)")
