"""One YAML file describes a whole run; this module turns it into typed, validated config.

Design (written down so every stage agrees):
- Each section is a small dataclass. The root ``Config`` holds one per stage.
- ``load_config(path, overrides)`` reads YAML, applies ``dotted.key=value`` overrides (values are
  parsed as YAML scalars/lists), then builds the dataclasses. Unknown keys, wrong types and
  out-of-range values raise ``ConfigError`` naming the dotted key and the file *before any work*.
- Range checks live next to the field as ``metadata={"ge": .., "gt": .., "le": .., "choices": ..}``.
- Paths are kept as strings; ``run.dir`` roots every output (``run.dir/<stage>/``); the default
  paths themselves are defined once, in ``components.paths`` (``Config.stage_dir``/``data_dir``
  delegate to it).
- Every key is read somewhere (``tests/test_layout.py`` checks it statically): a key that does
  nothing is removed, not kept for show.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the key and (when known) the file."""


def _f(default: Any = dataclasses.MISSING, *, factory=None, **checks) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata=checks)
    return field(default=default, metadata=checks)


# --------------------------------------------------------------------------- sections


@dataclass
class WandbConfig:
    mode: str = _f("offline", choices=("offline", "online", "disabled"))
    project: str = "coupling_dist"
    entity: Optional[str] = None


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    name: str = "run"
    seed: int = _f(0, ge=0)
    log_interval: int = _f(10, gt=0)  # steps between structured log lines
    progress: bool = True  # tqdm progress bars on rank 0
    # preprocess / stage_a / pair_store refuse to start when the bytes they plan to write exceed the
    # target's free space (planning/run_plan.check_disk); true: warn and start anyway
    ignore_disk_check: bool = False
    wandb: WandbConfig = _f(factory=WandbConfig)


@dataclass
class DataConfig:
    # what a sample is (coupling_dist/domains/): text (tokenizer ids), binary_image (0/1 pixels), dna
    domain: str = _f("text", choices=("text", "binary_image", "dna"))
    corpus: Union[str, list] = "asset:lee-corpus"  # file, glob or list of either
    format: str = _f("auto", choices=("auto", "text", "jsonl", "parquet"))
    text_field: str = "text"
    tokenizer: str = "asset:qwen2.5-tokenizer"  # HF dir or id, or asset:/tiny: spec
    seq_len: int = _f(32, gt=1)
    shard_size: int = _f(256, gt=0)  # samples per shard
    heldout_fraction: float = _f(0.05, ge=0.0, lt=1.0)
    max_samples: Optional[int] = _f(None, gt=0)
    out_dir: Optional[str] = None  # default: run.dir/data
    verify_existing: str = _f("sha256", choices=("sha256", "size"))  # how a re-run checks finished shards
    # output heads over the whole tokenizer vocabulary, or only the ids the shards use (data/vocab.py)
    vocab: str = _f("full", choices=("full", "corpus"))
    # text: the JSONL field / Parquet column holding each document's int class label (shard field
    # "label", as binary_image / dna write it); null: unlabelled (the shards stay byte-identical)
    label_field: Optional[str] = None
    # > 0: a class-conditional run: every sample's class is the shards' "label" field, in
    # [0, num_classes); Stage A's flow and Stage B's generator take it (README "Class-conditional runs")
    num_classes: int = _f(0, ge=0)


@dataclass
class EncoderConfig:
    model: Optional[str] = "tiny:qwen2"  # HF dir/id, tiny:/asset: spec, or null for tokens only
    layer: int = -1  # hidden layer index (hidden_states[layer])
    dtype: str = _f("float16", choices=("float16", "bfloat16", "float32"))
    batch_size: int = _f(64, gt=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))


@dataclass
class RayConfig:
    address: Optional[str] = None  # existing cluster ("auto" or host:port); null = local on loopback
    num_workers: int = _f(2, gt=0)  # actors (one per GPU on a cluster)
    num_cpus_per_worker: float = _f(1.0, gt=0)
    num_gpus_per_worker: float = _f(0.0, ge=0)
    max_retries: int = _f(3, ge=0)


@dataclass
class LoaderConfig:
    num_workers: int = _f(0, ge=0)  # DataLoader worker processes per rank
    verify_checksums: bool = False
    skip_bad: bool = False  # opt-in: skip bad samples, counting and logging each
    prefetch: int = _f(2, ge=1)  # batches each worker prepares ahead (with num_workers > 0)


@dataclass
class TrainConfig:
    """Shared by Stage A, Stage B and finetune: the Trainer reads only this section."""

    steps: int = _f(200, gt=0)
    batch_size: int = _f(32, gt=0)  # global batch (all data-parallel ranks)
    lr: float = _f(3e-4, gt=0)
    min_lr_ratio: float = _f(0.0, ge=0, le=1)
    weight_decay: float = _f(0.01, ge=0)
    betas: list = _f(factory=lambda: [0.9, 0.999])
    warmup_steps: int = _f(20, ge=0)
    schedule: str = _f("cosine", choices=("cosine", "constant"))
    restart_every: Optional[int] = _f(None, gt=0)  # cosine restarts period (steps)
    grad_clip: float = _f(1.0, ge=0)
    zero_stage: int = _f(2, choices=(0, 1, 2, 3))
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on CUDA, fp32 on CPU
    offload_optimizer: bool = False
    ema_decay: Optional[float] = _f(None, gt=0, lt=1)
    ckpt_interval: int = _f(100, gt=0)
    keep_last: int = _f(2, gt=0)
    eval_interval: int = _f(100, gt=0)
    eval_batches: int = _f(4, gt=0)
    resume: str = "auto"  # auto (latest if present) | none | path to a checkpoint dir
    peak_flops: Optional[float] = _f(None, gt=0)  # per device, for MFU; null = measured GEMM peak
    activation_checkpointing: bool = False  # recompute each transformer block in backward (distributed.parallelize)


@dataclass
class FlowConfig:
    kind: str = _f("realnvp", choices=("realnvp", "tarflow"))
    layers: int = _f(4, gt=0)
    hidden: int = _f(64, gt=0)  # conditioner width
    depth: int = _f(1, gt=0)  # transformer blocks per conditioner
    heads: int = _f(4, gt=0)
    scale_bound: float = _f(2.0, gt=0)  # tanh bound on log-scales
    # realnvp only. transformer: channel-split couplings, a transformer over positions (any length).
    # mlp: couplings over the flattened [positions x latent_dim] block with an MLP conditioner
    # (depth hidden layers of width hidden): a fixed length, far cheaper per parameter on CPU
    # (docs/QUALITY_RESEARCH.md, finding 12)
    conditioner: str = _f("transformer", choices=("transformer", "mlp"))
    # latent positions the mlp conditioner is built for; left out, it is data.seq_len / stage_a.patch
    positions: Optional[int] = _f(None, gt=0)


@dataclass
class DecoderConfig:
    width: int = _f(64, gt=0)
    depth: int = _f(2, gt=0)
    heads: int = _f(4, gt=0)
    ffn: int = _f(128, gt=0)


@dataclass
class StageAConfig:
    latent_dim: int = _f(16, gt=0)
    noise_scale: float = _f(0.2, gt=0)  # dequantization sigma
    learned_logvar: bool = False
    # tokens per latent position: the encoder maps k consecutive token embeddings to one latent
    # position, the decoder (and Stage B's generator) emit k tokens' logits per position, so the
    # latent is [T / k, d] (binary images: 16 = one 4x4 pixel patch, a 7x7 grid for 28x28 digits)
    patch: int = _f(1, gt=0)
    # "encoded" (the paper, Algorithm 1 / Eq. 2): every one of the T positions, pads included, is
    # encoded, flowed (no mask), and scored by KL, flow NLL and reconstruction, so z carries the
    # length. "passthrough": our earlier design, kept as an ablation: pads are plain noise that
    # the flow passes through, and every term covers real positions only (z then tells nothing
    # about the length at the flow's optimum).
    pad_positions: str = _f("encoded", choices=("encoded", "passthrough"))
    # true: preprocess stores tokens only and Stage A (and the pair store) run the frozen encoder
    # (encoder.model/layer/dtype) on each batch instead of reading stored features -- the same
    # features, without their disk (896 values per token for Qwen2.5-0.5B: ~6.9 TB for LM1B)
    online_encoder: bool = False
    ray_workers: Optional[int] = _f(None, gt=0)  # run as this many Ray-actor ranks (default under a Ray job: ray.num_workers)
    lambda_rec: float = _f(1.0, ge=0)
    lambda_kl: float = _f(1e-3, ge=0)
    lambda_flow_start: float = _f(0.5, ge=0)
    lambda_flow_end: float = _f(1.0, ge=0)
    flow_anneal_fraction: float = _f(0.05, ge=0, le=1)
    # data.num_classes > 0: probability that a training sample's class is replaced by the null
    # class, so the flow is also an unconditional flow NF(.; null) (the composite's CFG branch)
    cond_dropout: float = _f(0.1, ge=0, le=1)
    flow: FlowConfig = _f(factory=FlowConfig)
    decoder: DecoderConfig = _f(factory=DecoderConfig)
    train: TrainConfig = _f(factory=TrainConfig)


@dataclass
class PairStoreConfig:
    multiplicity: int = _f(1, gt=0)  # latents per sample
    dtype: str = _f("float16", choices=("float16", "bfloat16", "float32"))
    batch_size: int = _f(64, gt=0)
    ks_alpha: float = _f(0.01, gt=0, lt=1)
    report_samples: int = _f(2048, gt=0)
    artifact: Optional[str] = None  # exported Stage A dir; default run.dir/stage_a/export
    ray_workers: Optional[int] = _f(None, gt=0)  # run the ranks as this many Ray actors (single-process launch)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    # >0: also store the KD teacher's (stage_b.kd.teacher, at stage_b.kd.temperature) top-k
    # log-probabilities per position, so Stage B (stage_b.kd.source: cache) never runs the teacher
    teacher_topk: int = _f(0, ge=0)


@dataclass
class GeneratorConfig:
    # composite: G = D(NF^-1(z)) warm-started from the Stage A export (models/composite_generator.py);
    # the keys below are then unused (the architecture is Stage A's)
    kind: str = _f("onestep", choices=("onestep", "masked", "composite"))
    width: int = _f(64, gt=0)
    depth: int = _f(2, gt=0)
    heads: int = _f(4, gt=0)
    ffn: int = _f(128, gt=0)
    norm: str = _f("rmsnorm", choices=("rmsnorm", "layernorm"))
    act: str = _f("swiglu", choices=("swiglu", "gelu"))
    attention: str = _f("auto", choices=("auto", "sdpa", "flash"))


@dataclass
class KDConfig:
    teacher: Optional[str] = "tiny:qwen2"  # HF causal LM dir/id/spec; null disables KD
    weight: float = _f(1.0, ge=0)
    temperature: float = _f(2.0, gt=0)
    chunk_positions: int = _f(64, gt=0)  # rows of [B*T] per chunk
    chunk_vocab: int = _f(32768, gt=0)
    # live: run the teacher every step; cache: its top-k from the pair store (pair_store.teacher_topk),
    # worth it when the corpus is seen many times (the paper's LM1B run sees it about once: live)
    source: str = _f("live", choices=("live", "cache"))


@dataclass
class StageBConfig:
    model: GeneratorConfig = _f(factory=GeneratorConfig)
    kd: KDConfig = _f(factory=KDConfig)
    tp: int = _f(1, gt=0)  # tensor-parallel size; DP = world / tp
    label_smoothing: float = _f(0.0, ge=0, lt=1)
    latent_mix_prob: float = _f(0.3, ge=0, le=1)
    latent_mix_scale: float = _f(0.9, gt=0)
    # "update": with prob latent_mix_prob a whole update uses noise latents (the paper, Table 7:
    # "30% of updates"); "sample": each sample independently (our option).
    latent_mix_unit: str = _f("update", choices=("update", "sample"))
    # Weight of pad positions (after the first EOS) in the one-step CE; 1 = Eq. 2 (all T positions).
    pad_weight: float = _f(1.0, ge=0)
    # data.num_classes > 0: probability that a training sample's class is the null class (the
    # unconditional logits classifier-free guidance needs); drawn from the (seed, step, rank) generator
    cond_dropout: float = _f(0.1, ge=0, le=1)
    train: TrainConfig = _f(factory=lambda: TrainConfig(lr=2e-4, ema_decay=0.999))
    ray_workers: Optional[int] = _f(None, gt=0)  # run as this many Ray-actor ranks (default under a Ray job: ray.num_workers)


@dataclass
class FinetuneConfig:
    """Reward fine-tuning (Algorithm 6; ``python -m coupling_dist.finetune``, stages/finetune/)."""

    export: Optional[str] = None  # the generator export theta_0 to start from; default run.dir/stage_b/export
    reward: Optional[str] = None  # the reward classifier (python -m coupling_dist.classifier); default classifier.out
    lambda_reward: float = _f(1.0, gt=0)
    lambda_anchor: float = _f(1.0, ge=0)
    # the anchor penalty R(theta, theta_0) on the same (z, y): "logit" = MSE between the logits,
    # "kl" = KL(p_theta_0 || p_theta) per position (paper F.1: logit- or distribution-level matching)
    anchor: str = _f("logit", choices=("logit", "kl"))
    relaxation: str = _f("softmax", choices=("softmax", "gumbel", "straight_through"))  # rho (F.1)
    tau: float = _f(1.0, gt=0)  # relaxation temperature tau_r
    # y per sample: "balanced" = (global sample index) mod num_classes, "uniform" = drawn at random
    labels: str = _f("balanced", choices=("balanced", "uniform"))
    latent_scale: float = _f(1.0, gt=0)  # z ~ N(0, latent_scale^2 I)
    tp: int = _f(1, gt=0)  # tensor-parallel size; DP = world / tp
    # fine-tuning defaults (the paper's code: lr 1e-5, AdamW betas (0.9, 0.95), no weight decay, no
    # warm-up); a file that sets some finetune.train keys keeps these for the others
    train: TrainConfig = _f(factory=lambda: TrainConfig(steps=200, lr=1e-5, weight_decay=0.0, betas=[0.9, 0.95],
                                                        warmup_steps=0, schedule="constant", ckpt_interval=100,
                                                        eval_interval=50))
    ray_workers: Optional[int] = _f(None, gt=0)  # run as this many Ray-actor ranks (default under a Ray job: ray.num_workers)


@dataclass
class ClassifierGuidanceConfig:
    """Latent classifier guidance (Algorithm 5, ``guidance/latent.py``): ``steps`` = K gradient-ascent
    steps of size ``step_size`` (eta) on z of log p(y | relaxation(G(z, y))) under the reward classifier."""

    path: Optional[str] = None  # the reward classifier; default: classifier.out (run.dir/classifier/export)
    steps: int = _f(5, ge=0)  # K (0: no guidance steps, the plain decode of z)
    step_size: float = _f(1.0, gt=0)  # eta
    relaxation: str = _f("softmax", choices=("softmax", "gumbel", "straight_through"))  # rho (guidance/relax.py)
    tau: float = _f(1.0, gt=0)  # the relaxation's temperature (not the sampling temperature)


@dataclass
class SampleConfig:
    # "generator": the Stage B export; "stage_a": z -> inverse flow -> Stage A decoder (the paper's
    # flow-reverse diagnostic, from the Stage A export)
    kind: str = _f("generator", choices=("generator", "stage_a"))
    num_samples: int = _f(64, gt=0)
    batch_size: int = _f(32, gt=0)
    latent_scale: float = _f(0.85, gt=0)
    temperature: float = _f(0.6, gt=0)
    top_p: float = _f(0.95, gt=0, le=1)
    steps: int = _f(1, gt=0)  # few-step K (masked denoiser only)
    eta: float = _f(1.0, ge=0)  # P2-self remasking strength
    kappa: str = _f("linear", choices=("linear", "cosine"))  # P2-self unmasking schedule
    proposal_top_p: float = _f(1.0, gt=0, le=1)  # P2-self proposals: 1 = no nucleus (Algorithm 3)
    seed: int = _f(0, ge=0)
    out: Optional[str] = None  # default: run.dir/sample/samples.jsonl
    step_temperatures: Optional[list] = None  # per-step tau_i for P2-self (length = steps)
    export: Optional[str] = None  # export dir; default: run.dir/stage_b/export (kind stage_a: run.dir/stage_a/export)
    # class-conditional exports (data.num_classes > 0): none = the conditional logits; cfg =
    # classifier-free guidance l_u + cfg_scale * (l_c - l_u) (Algorithm 4); classifier = latent
    # classifier guidance (Algorithm 5)
    guidance: str = _f("none", choices=("none", "cfg", "classifier"))
    cfg_scale: float = _f(1.0, ge=0)
    label: int = _f(-1, ge=-1)  # -1: balanced classes (sample i gets i % num_classes); k >= 0: class k
    ray_workers: Optional[int] = _f(None, gt=0)  # run as this many Ray-actor ranks (default under a Ray job: ray.num_workers)
    classifier: ClassifierGuidanceConfig = _f(factory=ClassifierGuidanceConfig)


@dataclass
class ClassifierConfig:
    """The reward classifier (``python -m coupling_dist.classifier``): trained on the training shards'
    tokens and labels, separate from the evaluation classifier (another seed and width)."""

    steps: int = _f(1500, gt=0)  # AdamW steps
    batch_size: int = _f(128, gt=0)
    lr: float = _f(1e-3, gt=0)
    seed: Optional[int] = _f(None, ge=0)  # default run.seed + 1 (the evaluation classifier uses run.seed)
    width: int = _f(64, gt=0)  # channel width of the convolutions (the evaluation classifier: 32)
    # fraction of each batch fed soft inputs (one-hot mixed with random distributions), so that the
    # reward is meaningful on the relaxed samples classifier guidance feeds it; 0: one-hot only
    soft_fraction: float = _f(0.5, ge=0, le=1)
    out: Optional[str] = None  # default: run.dir/classifier/export


@dataclass
class GuidanceEvalConfig:
    """The guidance table of a class-conditional run (README "Guidance table"): every row draws
    ``num_samples`` balanced-label one-step samples at the sample section's latent scale / temperature."""

    enabled: bool = True  # with a class-conditional generator export (data.num_classes > 0)
    cfg_scales: list = _f(factory=lambda: [0.0, 1.0, 2.0, 3.0, 5.0])  # 0: unconditional, 1: conditional
    classifier_steps: list = _f(factory=lambda: [5])  # K of Algorithm 5 (needs the reward classifier)
    classifier_step_sizes: list = _f(factory=lambda: [1.0, 3.0, 10.0])  # eta of Algorithm 5
    finetune_series: bool = True  # the reward fine-tuned export (run.dir/finetune/export) when present
    num_samples: Optional[int] = _f(None, gt=0)  # default: evaluate.num_samples


@dataclass
class EvaluateConfig:
    scorer: str = "tiny:gpt2"  # HF causal LM dir/id/spec
    protocol: str = _f("mdlm", choices=("mdlm", "paper"))
    samples: Optional[str] = None  # default: run.dir/sample/samples.jsonl
    temperatures: list = _f(factory=lambda: [0.5, 0.6, 0.7])
    latent_scales: list = _f(factory=lambda: [0.85])
    top_ps: list = _f(factory=lambda: [0.95])
    steps: list = _f(factory=lambda: [1])
    num_samples: int = _f(64, gt=0)
    batch_size: int = _f(16, gt=0)
    num_actors: int = _f(2, gt=0)
    max_text_chars: int = _f(10000, gt=0)
    reference: Optional[str] = None  # real text (one per line, or JSONL with 'text'); default: held-out shards
    reference_samples: int = _f(1024, gt=0)  # at most this many held-out texts
    stage_a_series: bool = True  # also sweep the Stage-A-only sampler (needs run.dir/stage_a/export)
    factorized_series: bool = True  # also score the factorized baseline (per-position marginals of the shards)
    sweep: bool = True  # draw and score samples for every sweep setting (needs the export)
    # classifier-Frechet domains (binary_image): training steps of the evaluation classifier whose
    # penultimate features replace Inception's (evaluation/feature_net.py; cached in run.dir/eval)
    classifier_steps: int = _f(1500, gt=0)
    # class-conditional exports: the guidance table (stages/evaluate/guidance.py, the paper's Figure 4)
    guidance: GuidanceEvalConfig = _f(factory=GuidanceEvalConfig)


@dataclass
class PipelineConfig:
    stages: list = _f(factory=lambda: list(PIPELINE_STAGES))
    nproc: int = _f(1, gt=0)  # ranks for the distributed stages (stage_a, pair_store, stage_b, sample)
    launcher: str = _f("auto", choices=("auto", "local", "torchrun", "srun"))
    # auto: srun inside a SLURM allocation with several tasks, torchrun when nproc > 1, else local


PIPELINE_STAGES = ("preprocess", "stage_a", "pair_store", "stage_b", "sample", "evaluate")  # the default run
# every stage the pipeline can run, in their order (guidance adds the reward classifier and reward
# fine-tuning: `pipeline.stages: [..., stage_b, classifier, finetune, sample, evaluate]`)
ALL_STAGES = ("preprocess", "stage_a", "pair_store", "stage_b", "classifier", "finetune", "sample", "evaluate")


@dataclass
class Config:
    run: RunConfig = _f(factory=RunConfig)
    data: DataConfig = _f(factory=DataConfig)
    encoder: EncoderConfig = _f(factory=EncoderConfig)
    ray: RayConfig = _f(factory=RayConfig)
    loader: LoaderConfig = _f(factory=LoaderConfig)
    stage_a: StageAConfig = _f(factory=StageAConfig)
    pair_store: PairStoreConfig = _f(factory=PairStoreConfig)
    stage_b: StageBConfig = _f(factory=StageBConfig)
    finetune: FinetuneConfig = _f(factory=FinetuneConfig)
    sample: SampleConfig = _f(factory=SampleConfig)
    evaluate: EvaluateConfig = _f(factory=EvaluateConfig)
    classifier: ClassifierConfig = _f(factory=ClassifierConfig)
    pipeline: PipelineConfig = _f(factory=PipelineConfig)

    def stage_dir(self, stage: str) -> str:
        from .components.paths import stage_dir

        return stage_dir(self, stage)

    @property
    def data_dir(self) -> str:
        from .components.paths import data_dir

        return data_dir(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; return (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # YAML 1.1 reads "1e-4" / "9.89e14" (no dot or sign in the exponent) as strings.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, list), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_range(key: str, value: Any, meta: typing.Mapping, where: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: '{key}' = {value!r} must be one of {list(meta['choices'])}")
    for op, test, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                           ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
        if op in meta and not test(value, meta[op]):
            raise ConfigError(f"{where}: '{key}' = {value!r} must be {word} {meta[op]}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key '{key}' (valid keys here: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            f = fields[name]
            if f.default_factory is not dataclasses.MISSING and isinstance(value, dict):
                # the section's own defaults (its factory's: e.g. stage_b.train's lr 2e-4 and EMA 0.999,
                # finetune.train's) stay for the keys the file leaves out -- not the plain class's
                value = _merged(dataclasses.asdict(f.default_factory()), value)
            kwargs[name] = _build(tp, value, key, where)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{where}: '{key}' = {value!r} has the wrong type (expected {_type_name(tp)})")
        _check_range(key, coerced, fields[name].metadata, where)
        kwargs[name] = coerced
    obj = cls(**kwargs)
    # Defaults are validated too (a default of a nested section with overridden fields, etc.).
    for name, f in fields.items():
        if name not in kwargs and not dataclasses.is_dataclass(hints[name]):
            _check_range(f"{prefix}.{name}" if prefix else name, getattr(obj, name), f.metadata, where)
    return obj


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def section_from_dict(cls: type, data: Any, key: str, where: str) -> Any:
    """One section (e.g. ``StageAConfig`` from an export's config.json), validated like a config file."""
    return _build(cls, data, key, where)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """Load, override and validate. ``path=None`` gives the built-in defaults."""
    data: dict = {}
    where = path or "<defaults>"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset "
                              f"{e.start}); save the config as UTF-8 (is it a YAML file?)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    if overrides:
        where = f"{where} (with overrides)"
    cfg = _build(Config, data, "", where)
    fl = cfg.stage_a.flow
    if fl.conditioner == "mlp" and fl.positions is None and cfg.data.seq_len % cfg.stage_a.patch == 0:
        fl.positions = cfg.data.seq_len // cfg.stage_a.patch  # derived (recorded in the Stage A export)
    from .config_checks import cross_checks  # the rules between keys (this module holds the schema)

    cross_checks(cfg, where)
    return cfg
