"""Let megatron-core's real TP/PP/DDP/optimizer/checkpoint code run on CPU with gloo.

megatron-core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as a device,
``device="cuda"`` literals and ``Tensor.cuda()`` in the pipeline schedules, grad buffers,
optimizer and ``broadcast_data``, ``p.type() == "torch.cuda.FloatTensor"`` asserts, a CUDA RNG
states tracker, and ``torch.cuda.synchronize()`` around checkpoint saves. CI machines have no
GPU, and a re-implementation of megatron for tests would test nothing, so this module bends
those few spots instead:

* a ``TorchFunctionMode`` that rewrites every CUDA device argument to ``cpu`` (it covers
  factory functions, ``Tensor.to``/``Tensor.cuda`` and anything else taking ``device=``, without
  patching megatron names; a mode is per thread, so it is entered in the installing thread);
* ``Tensor.type()`` reports CPU tensors with their CUDA names, so the dtype asserts hold;
* ``torch.cuda.current_device`` returns the CPU device, ``synchronize`` is a no-op;
* a CPU RNG states tracker, a subclass of megatron's ``CudaRNGStatesTracker``, so
  ``model_parallel_cuda_manual_seed`` and the tracker's ``fork()`` (dropout, TP init) work.

It is installed only when ``torch.cuda.is_available()`` is false (``install_cpu_runtime`` is a
no-op otherwise) and only once per process. Known limits: sequence parallelism needs TE/apex
norms; set ``batch_p2p_comm=False`` for the pipeline schedules on CPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_INSTALLED_THREADS: set[int] = set()
_PATCHED = False


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _to_cpu_device(value: Any) -> Any:
    return _CPU if _is_cuda_device(value) else value


class CudaToCpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to the CPU device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to or func is torch.Tensor.new_empty:
            args = tuple(_to_cpu_device(a) for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG states tracker over the CPU default generator.

        Model init on CPU and dropout draw from the default CPU generator, so forking swaps its
        state exactly as the CUDA tracker swaps the CUDA generator's.
        """

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
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _patch_process_wide() -> None:
    """Process-wide patches (idempotent): CUDA queries that megatron calls by name."""
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    tp_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _PATCHED = True


def install_cpu_runtime() -> bool:
    """Install the CPU runtime in this thread if CUDA is absent; returns whether it is active.

    Call it from the thread that runs megatron (the main thread of each rank) before building
    models. Safe to call repeatedly.
    """
    if torch.cuda.is_available():
        return False
    _patch_process_wide()
    thread_id = threading.get_ident()
    if thread_id not in _INSTALLED_THREADS:
        # Entered for the lifetime of the thread: the mode must wrap every megatron call.
        CudaToCpuDeviceMode().__enter__()
        _INSTALLED_THREADS.add(thread_id)
    return True


def cpu_runtime_active() -> bool:
    return threading.get_ident() in _INSTALLED_THREADS
