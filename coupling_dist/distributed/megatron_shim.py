"""CPU shims for megatron-core, in ONE place, applied only when CUDA is absent.

megatron-core's Column/RowParallelLinear and VocabParallelEmbedding run on CPU as they are (with
``use_cpu_initialization``). What does not: its RNG tracker (``model_parallel_cuda_manual_seed``,
``get_cuda_rng_tracker().fork()``, activation checkpointing) reads and writes the *CUDA* generator
state, and several helpers call ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()``
unconditionally, which raise on a CPU-only torch. ``apply()`` replaces exactly those:

- the RNG tracker class becomes ``CpuRNGStatesTracker``: the same named, forkable states, held as
  CPU generator states (so TP-region randomness is still per-TP-rank and reproducible);
- ``torch.cuda.current_device`` returns 0 and ``torch.cuda.synchronize`` is a no-op (there is no
  device to synchronise; both would otherwise raise "Torch not compiled with CUDA").

``apply()`` is idempotent and a no-op when CUDA is available: on GPUs megatron runs unpatched.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("coupling_dist.distributed.megatron_shim")
_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def applied() -> bool:
    return _APPLIED


def _tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker with the CPU generator standing in for the CUDA one."""

        def __init__(self, *args, **kwargs):
            kwargs["use_cudagraphable_rng"] = False
            super().__init__(*args, **kwargs)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            prev_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)
                self._current_state_name = prev_name

    return CpuRNGStatesTracker


def apply() -> bool:
    """Install the shims when CUDA is absent. Returns True when they are (now) installed."""
    global _APPLIED
    if _APPLIED:
        return True
    if not needed():
        return False
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _tracker_class()
    # initialize_rng_tracker() instantiates ``CudaRNGStatesTracker`` by module-global name.
    mrandom.CudaRNGStatesTracker = tracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, tracker):
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    _APPLIED = True
    log.info("megatron-core CPU shims applied (no CUDA): CPU RNG tracker, current_device/synchronize stubs")
    return True
