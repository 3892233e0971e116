"""The one training loop shared by Stage A and Stage B.

A stage hands the Trainer a ``TrainConfig`` (``stage_x.train``), a *task* (below), its loaders and
its stage directory. The Trainer owns everything generic: the DeepSpeed engine (ZeRO 0/1/2/3,
client ``torch.optim.AdamW`` + warmup/cosine ``LambdaLR``, gradient clipping, fp32 on CPU / bf16
on CUDA), the step loop, logging and throughput/MFU, held-out evaluation, EMA, sharded atomic
checkpoints, exact resume, and preemption (SIGTERM/SIGUSR1 -> checkpoint at the next step
boundary -> exit status 128 + signal: 143 / 138, for SLURM requeue).

The task protocol (duck-typed; Stage B implements the same methods)::

    build_model() -> nn.Module                       # called once, same seed on every rank
    loss(model, batch, step) -> (loss, {name: float|0-d tensor})   # runs inside engine.forward
    eval_metrics(model, batch) -> {name: float|0-d tensor}          # no_grad, eval mode
    flops_per_sample() -> {part: training FLOPs per sample}         # e.g. {"student":.., "teacher":..}
    optional: mpu (DeepSpeed/megatron mpu object, for TP groups), tokens_in_batch(batch) -> int,
              ds_config_overrides (dict merged into the DeepSpeed config), export(trainer, out_dir),
              tp_partition_dims() -> {param name: split dim} of the TP-split parameters (makes the
              checkpoints resumable at another TP size: ``distributed/tp_reshape.py``),
              checkpoint_meta() -> {json-able} saved with every checkpoint, and
              check_resume(saved_meta, path) called with it before a resume loads anything
              (raises ``InputError`` when the checkpoint belongs to other frozen inputs, e.g.
              reward fine-tuning's theta_0, which lives outside the engine and is not saved)

``loss``/``eval_metrics`` run inside the DeepSpeed engine's forward (through a thin wrapper
module), so ZeRO-3's parameter gathering hooks fire exactly as for a normal forward; they receive
the task's own module. Loaders follow the ShardLoader API: iteration yields this rank's slice of
global batch ``loader.step``; ``step``, ``state_dict()``, ``load_state_dict()``.

Exactness (CPU, fp32, same world size): a resumed run replays the uninterrupted one bit for bit:
the loader position is the global step, every rank restores its python/numpy/torch RNG, optimizer
and scheduler state come back from the DeepSpeed shards, evaluation runs under a saved-and-restored
RNG so it never shifts the training stream, and deterministic algorithms are requested on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.tp_reshape import layout_meta, universal_info
from . import dist as D
from .checkpoint import CheckpointManager, find_resume, rng_state, seed_everything, set_rng_state
from .dist import PREEMPT_SIGNALS, exit_code_for
from .ema import EMA
from .logging import MetricsLogger, get_logger, progress
from .metrics import Throughput, measure_gemm_flops
from .preflight import InputError
from .optim import build_optimizer, scheduler_factory

LOG = get_logger("trainer")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: auto is bf16 on CUDA, fp32 elsewhere."""
    return precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32


@dataclasses.dataclass
class TrainResult:
    step: int
    preempted: Optional[int] = None  # the signal number when stopped by preemption
    last_checkpoint: Optional[str] = None
    final_metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.preempted is None else exit_code_for(self.preempted)


class _StepModule(nn.Module):
    """Runs the task's loss/eval inside ``forward`` so DeepSpeed (ZeRO-3 hooks, bf16) sees a forward."""

    def __init__(self, task, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "task", task)  # not a submodule
        self.model = model

    def forward(self, batch: dict, step: int, mode: str = "train"):
        if mode == "train":
            return self.task.loss(self.model, batch, step)
        return self.task.eval_metrics(self.model, batch)


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict update (the task's ``ds_config_overrides`` refine the generated config)."""
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _as_float(v: Any) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the buffers ``state_dict`` would hold: not the non-persistent ones (e.g. the MLP
    flow's coupling indices, rebuilt from the config), which an export must not carry."""
    out = {}
    for prefix, mod in model.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return out


class Trainer:
    def __init__(self, cfg, task, train_loader, stage_dir: str, *, heldout_loader=None, run=None,
                 stage: str = "train", full_config: Optional[dict] = None, metrics: Optional[MetricsLogger] = None):
        self.cfg, self.task, self.stage, self.stage_dir = cfg, task, stage, stage_dir
        self.train_loader, self.heldout_loader = train_loader, heldout_loader
        self.seed = getattr(run, "seed", 0)
        self.log_interval = getattr(run, "log_interval", 10)
        self.show_progress = bool(getattr(run, "progress", True)) and D.is_main()
        self.full_config = full_config or {"train": dataclasses.asdict(cfg)}
        self.metrics = metrics
        self._signal: Optional[int] = None
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}
        try:
            self._setup(task, heldout_loader)
        except BaseException:
            self._restore_signals()
            raise

    def _setup(self, task, heldout_loader) -> None:
        cfg = self.cfg
        D.init_distributed()
        self.device = D.device()
        if self.device.type == "cpu":
            # CPU kernels are deterministic already; this turns any nondeterministic op into a warning.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.mpu = getattr(task, "mpu", None)
        self._layout()
        if cfg.batch_size % self.dp_world:
            raise ValueError(f"train.batch_size ({cfg.batch_size}) must be divisible by the data-parallel size "
                             f"({self.dp_world})")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.layout = {"world": D.world_size(), "dp_world": self.dp_world, "mp_world": self.mp_world,
                       "zero_stage": cfg.zero_stage, "precision": self.precision, "global_batch": cfg.batch_size}
        key = f"{self.stage}.train.resume" if self.stage in ("stage_a", "stage_b", "finetune") else "train.resume"
        self.ckpt = CheckpointManager(self.stage_dir, cfg.keep_last, resume_key=key)
        self.metrics = self.metrics or MetricsLogger(self.stage_dir, self.stage, None, enabled=D.is_main())
        self.peak_flops = cfg.peak_flops or self._measured_peak()

        plan = self.ckpt.plan_resume(cfg.resume, self.layout)
        if plan is not None and hasattr(task, "check_resume"):  # before any weights are loaded
            saved = self.ckpt.trainer_state(plan["path"]).get("task_meta")
            task.check_resume(json.loads(saved) if saved else None, plan["path"])
        seed_everything(self.seed)  # identical initial weights on every rank
        self.model = task.build_model()
        self.engine = self._build_engine(universal=bool(plan and plan["universal"]))
        self.tp_meta = self._tp_meta()
        self.ema = None
        if cfg.ema_decay:
            group = self.mpu.get_data_parallel_group() if self.mpu else None
            self.ema = EMA(self.model, cfg.ema_decay, self.dp_rank, self.dp_world, group)
        self.step = self._saved_step = 0
        self._heldout_state0 = heldout_loader.state_dict() if heldout_loader is not None else None
        if plan is None:
            seed_everything(self.seed + 7919 * (D.rank() + 1))  # per-rank streams (dropout, noise)
        else:
            self._resume(plan)
        LOG.info("trainer ready: %s, %d params, start step %d/%d", json.dumps(self.layout),
                 sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.parameters()),
                 self.step, cfg.steps)

    # ------------------------------------------------------------------ set-up

    def _layout(self) -> None:
        if self.mpu is not None:
            self.dp_rank, self.dp_world = self.mpu.get_data_parallel_rank(), self.mpu.get_data_parallel_world_size()
            self.mp_rank, self.mp_world = self.mpu.get_model_parallel_rank(), self.mpu.get_model_parallel_world_size()
        else:
            self.dp_rank, self.dp_world, self.mp_rank, self.mp_world = D.rank(), D.world_size(), 0, 1

    def _measured_peak(self) -> float:
        dtype = training_dtype(self.cfg.precision, self.device)
        peak = measure_gemm_flops(self.device, dtype) if D.is_main() else None
        return float(D.broadcast_object(peak))

    def ds_config(self, universal: bool = False) -> dict:
        c = self.cfg
        zero: dict = {"stage": c.zero_stage}
        if c.offload_optimizer and c.zero_stage >= 1:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        conf = {"train_batch_size": c.batch_size, "train_micro_batch_size_per_gpu": c.batch_size // self.dp_world,
                "gradient_accumulation_steps": 1, "gradient_clipping": c.grad_clip, "zero_optimization": zero,
                # client torch AdamW: no JIT op builds; DeepSpeed must not swap it for its CPU Adam
                "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                "steps_per_print": 2**62, "wall_clock_breakdown": False,
                "checkpoint": {"load_universal": universal}}
        # DeepSpeed allocates whole communication buckets every step (default 5e8 elements = 2 GB
        # fp32): size them to the model so small models do not pay for page-faulting gigabytes.
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        bucket = -(-int(min(5e8, max(1e6, n))) // 1024) * 1024  # DeepSpeed wants alignment multiples
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if c.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=int(min(1e5, n // 100)))
        if self.precision == "bf16":
            conf["bf16"] = {"enabled": True}
        return _merge(conf, getattr(self.task, "ds_config_overrides", None) or {})

    def _tp_meta(self) -> Optional[dict]:
        """The task's TP split layout; also hands DeepSpeed the matching universal_checkpoint_info,
        which it then saves with every checkpoint (what lets ds_to_universal merge TP slices)."""
        dims_fn = getattr(self.task, "tp_partition_dims", None)
        if dims_fn is None:
            return None
        meta = layout_meta(self.model, dims_fn(), self.mp_world)
        ds_name = {id(p): n for n, p in self.engine.module.named_parameters()}
        names = {n: ds_name[id(p)] for n, p in self.model.named_parameters() if n in meta["params"]}
        self.engine.module.universal_checkpoint_info = universal_info(meta, names)
        return meta

    def _build_engine(self, universal: bool):
        import deepspeed

        wrapper = _StepModule(self.task, self.model)
        optimizer = build_optimizer(self.model, self.cfg)
        engine, _, _, self.scheduler = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=scheduler_factory(self.cfg),
            config=self.ds_config(universal), mpu=self.mpu, dist_init_required=False)
        return engine

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: checkpointing inside a signal handler could interrupt a collective.
        self._signal = signum

    def _restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg, result = self.cfg, TrainResult(self.step)
        bar = progress(total=cfg.steps, initial=self.step, desc=self.stage, enabled=self.show_progress)
        it = iter(self.train_loader)
        tput = Throughput(self.task.flops_per_sample(), self.peak_flops, D.world_size())
        window: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                batch, it = self._next_batch(it)
                self.engine.train()
                loss, parts = self.engine(batch, self.step, "train")
                self.engine.backward(loss)
                self.engine.step()
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                stats, stop = self._reduce_step(loss, parts, batch)
                tput.add(cfg.batch_size, stats.pop("_tokens"))
                for k, v in stats.items():
                    window[k] = window.get(k, 0.0) + v
                bar.update(1)

                if self.step % self.log_interval == 0 or self.step == cfg.steps:
                    row = dict(stats, loss_avg=window["loss"] / tput.steps, lr=self.scheduler.get_last_lr()[0],
                               grad_norm=self._grad_norm(), data_step=self.train_loader.step, **tput.rates())
                    self.metrics.log_metrics(self.step, row)
                    bar.set_postfix(loss=f"{stats['loss']:.4g}")
                    result.final_metrics = row
                    window = {}
                    tput.reset()
                if self.heldout_loader is not None and self.step % cfg.eval_interval == 0:
                    self.metrics.log_metrics(self.step, self.evaluate(), prefix="eval_")
                due = self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps or stop is not None
                if due and self.step != self._saved_step:
                    result.last_checkpoint = self.save_checkpoint()
                if stop is not None:
                    LOG.warning("stopping at step %d after signal %d (checkpoint %s); exit status %d",
                                self.step, stop, result.last_checkpoint, exit_code_for(stop))
                    result.preempted = stop
                    break
        except Exception as e:
            if D.world_size() > 1 and not isinstance(e, InputError) and D.is_peer_failure(e):
                # A dead peer must end every rank with a message, not a hang (the collective timeout
                # bounds the wait; gloo usually notices a closed socket at once).
                latest = find_resume(self.ckpt.root)
                msg = (f"rank {D.rank()}: lost contact with the other ranks at step {self.step} "
                       f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); a rank died or the network "
                       f"failed. Last complete checkpoint: {latest or 'none'}; relaunch the same command to resume.")
                LOG.error(msg)
                raise D.PeerFailure(msg) from e
            raise
        finally:
            bar.close()
            self._restore_signals()
        result.step = self.step
        return result

    def _next_batch(self, it):
        try:
            batch = next(it)
        except StopIteration:  # an epoch ended: the loader continues from its own step
            it = iter(self.train_loader)
            batch = next(it, None)
            if batch is None:
                raise RuntimeError(f"the train loader yields no batches at step {self.step} (fewer samples than "
                                   f"one global batch of {self.cfg.batch_size}?)") from None
        dev = self.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}, it

    def _tokens(self, batch: dict) -> int:
        if hasattr(self.task, "tokens_in_batch"):
            return int(self.task.tokens_in_batch(batch))
        if "mask" in batch:
            return int(batch["mask"].sum().item())
        tok = batch.get("tokens")
        return int(tok.numel()) if tok is not None else 0

    def _reduce_step(self, loss, parts: dict, batch: dict) -> tuple[dict, Optional[int]]:
        """One all-reduce per step: metric means over ranks, token count, and the preemption flag
        (so every rank stops at the same step even if only one received the signal)."""
        keys = sorted(k for k in parts if k != "loss")
        vals = [_as_float(loss)] + [_as_float(parts[k]) for k in keys]
        vals += [float(self._tokens(batch)), float(self._signal or 0)]
        t = torch.tensor(vals, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        if D.world_size() > 1:
            sig = t[-1:].clone()
            dist.all_reduce(t)
            dist.all_reduce(sig, op=dist.ReduceOp.MAX)
            t[-1] = sig[0]
        w = D.world_size()
        out = {"loss": t[0].item() / w}
        out.update({k: t[1 + i].item() / w for i, k in enumerate(keys)})
        out["_tokens"] = int(round(t[-2].item() / self.mp_world))  # TP ranks see the same tokens
        stop = int(t[-1].item())
        return out, (stop or None)

    def _grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        return float("nan") if g is None else _as_float(g)

    # ------------------------------------------------------------------ evaluation

    @contextmanager
    def _rng_fork(self):
        saved = rng_state()
        try:
            yield
        finally:
            set_rng_state(saved)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean of ``task.eval_metrics`` over the first ``eval_batches`` held-out batches (the same
        batches every time), averaged over ranks."""
        self.heldout_loader.load_state_dict(self._heldout_state0)
        it, sums, n = iter(self.heldout_loader), {}, 0
        with self._rng_fork():
            self.engine.eval()
            for _ in range(self.cfg.eval_batches):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                for k, v in self.engine(batch, self.step, "eval").items():
                    sums[k] = sums.get(k, 0.0) + _as_float(v)
                n += 1
            self.engine.train()
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        if D.world_size() > 1:
            dist.all_reduce(t)
        count = max(t[-1].item(), 1.0)
        return {k: t[i].item() / count for i, k in enumerate(keys)}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        if self.train_loader.step != self.step:  # one global batch per optimizer step, always
            raise RuntimeError(f"train loader is at step {self.train_loader.step} but the trainer at {self.step}: "
                               f"the data position would not resume exactly")
        loader = self.train_loader.state_dict()
        state = {"step": self.step, "data_step": self.train_loader.step, "loader": json.dumps(loader),
                 "rng": rng_state(), "layout": json.dumps(self.layout), "mp_rank": self.mp_rank,
                 "config": json.dumps(self.full_config, default=str), "time": time.time()}
        if hasattr(self.task, "checkpoint_meta"):
            state["task_meta"] = json.dumps(self.task.checkpoint_meta(), sort_keys=True)
        ema = None
        if self.ema is not None:
            ema = dict(self.ema.state_dict(), mp_rank=self.mp_rank)
        path = self.ckpt.save(self.engine, self.step, state, ema, self.layout, self.tp_meta)
        self._saved_step = self.step
        LOG.info("checkpoint %s", path)
        return path

    def _resume(self, plan: dict) -> None:
        own, first, ema_shards = self.ckpt.load(self.engine, plan, self.mp_rank, self.mp_world, self.tp_meta,
                                                self.ema.owned if self.ema is not None else None)
        self.step = self._saved_step = int(first["step"])
        src = own or first
        loader_state = json.loads(src["loader"])
        self.train_loader.load_state_dict(loader_state)
        if self.train_loader.step != int(src["data_step"]):
            raise RuntimeError(f"loader resumed at step {self.train_loader.step}, checkpoint says {src['data_step']}")
        if self.ema is not None:
            self.ema.load_shards(ema_shards)
        if own is not None:
            set_rng_state(own["rng"])
        else:
            # another world size: per-rank RNG streams cannot be mapped; reseed deterministically
            seed_everything(self.seed + 1_000_003 * self.step + 7919 * (D.rank() + 1))
        LOG.info("resumed from %s at step %d%s", plan["path"], self.step,
                 (f" (universal conversion: layout changed, TP {plan['marker'].get('mp_world', 1)} -> {self.mp_world})"
                  if plan["universal"] else ""))

    # ------------------------------------------------------------------ weights for export

    def full_state_dict(self, include_buffers: bool = True) -> Optional[dict]:
        """fp32 master weights of the task's model, gathered on DP rank 0 (None elsewhere).
        Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None and hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.clone()
            if full is None:
                full = p.data
            if self.dp_rank == 0:
                out[name] = full.detach().float().cpu().clone()
        if include_buffers and self.dp_rank == 0:
            out.update(persistent_buffers(self.model))
        return out if self.dp_rank == 0 else None

    def ema_state_dict(self) -> Optional[dict]:
        """Full EMA weights (+ current buffers) on DP rank 0; None elsewhere or without EMA."""
        if self.ema is None:
            return None
        sd = self.ema.full_state_dict()
        if sd is not None:
            sd.update(persistent_buffers(self.model))
        return sd

    def close(self) -> None:
        self.metrics.close()
