"""Throughput and model-FLOP utilisation.

MFU = achieved model FLOP/s per device / peak FLOP/s per device. The peak is ``train.peak_flops``
when set (e.g. 989e12 for an H100's dense bf16), otherwise this machine's *measured* dense GEMM
rate in the training dtype, measured once by rank 0 and cached in ``gemm_peak.json`` in the cache
directory (``components.paths``), keyed by device name, dtype and thread count (on CPU the rate
depends on the threads a rank uses). Model FLOPs come from the task (``flops_per_sample``:
e.g. {"student": f, "teacher": f}, training FLOPs per sample), so MFU is reported per part and in
total; recomputation (activation checkpointing) is deliberately not counted, as usual for MFU.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional

import torch

from .atomic import write_json
from .paths import cache_dir

_MEMO: dict = {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _time_gemm(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)  # private: never perturbs the training RNG
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def measure_gemm_flops(device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                       use_cache: bool = True) -> float:
    """Best-of-3 dense square GEMM FLOP/s on ``device`` in ``dtype`` (cached; see module doc)."""
    device = device or torch.device("cpu")
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 3)  # 1024 under-fills 2 CPU cores
    key = f"{device_name(device)}|{str(dtype).replace('torch.', '')}|threads={torch.get_num_threads()}|n={n}"
    if use_cache and key in _MEMO:
        return _MEMO[key]
    path = os.path.join(cache_dir(), "gemm_peak.json")
    table = {}
    if use_cache and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                table = json.load(fh)
        except (OSError, ValueError):
            table = {}
        if key in table:
            _MEMO[key] = float(table[key])
            return _MEMO[key]
    flops = max(_time_gemm(n, dtype, device, reps) for _ in range(3))
    _MEMO[key] = flops
    if use_cache:
        table[key] = flops
        try:
            write_json(path, table)
        except OSError:  # a read-only cache only costs a re-measurement next time
            pass
    return flops


class Throughput:
    """Accumulates steps between two log lines and turns them into rates.

    ``flops_per_sample``: dict of training FLOPs per sample by part; ``n_devices``: all ranks (the
    FLOPs of one sample are spread over the model-parallel ranks that compute it)."""

    def __init__(self, flops_per_sample: dict, peak_flops: float, n_devices: int):
        self.fps = {k: float(v) for k, v in (flops_per_sample or {}).items()}
        self.peak, self.n_devices = float(peak_flops), max(1, int(n_devices))
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.tokens, self.steps = time.perf_counter(), 0, 0, 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.steps += 1

    def rates(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        sps = self.samples / dt
        out = {"step_time_s": dt / max(1, self.steps), "samples_per_s": sps, "tokens_per_s": self.tokens / dt}
        total = 0.0
        for part, f in self.fps.items():
            achieved = f * sps / self.n_devices
            total += achieved
            out[f"mfu_{part}"] = achieved / self.peak
        out["flops_per_s_per_device"] = total
        out["mfu"] = total / self.peak
        return out
