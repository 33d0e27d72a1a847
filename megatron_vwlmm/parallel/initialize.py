"""Bring up torch.distributed and megatron's parallel state the same way everywhere.

The trainer (torchrun / srun), the tests and the benchmarks all go through
``initialize_distributed`` so that the backend choice (nccl on CUDA, gloo otherwise), the CPU
runtime for megatron-core and the seeding follow one path.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_vwlmm.parallel.cpu_runtime import install_cpu_runtime


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's TP/DP RNG tracker (as Megatron-LM does)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_s: int = 600,
) -> None:
    """Initialise torch.distributed from torchrun/srun env vars and megatron's parallel state.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (set by torchrun; the Slurm
    scripts export them from SLURM_* variables). Data-parallel size is world / (tp * pp).
    """
    from megatron.core import parallel_state

    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp})"
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        install_cpu_runtime()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if not parallel_state.model_parallel_is_initialized():
        # The TP/PP/DP groups get the same collective timeout as the default group (megatron
        # would give them 30 minutes): a rank whose peer died fails after timeout_s.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            distributed_timeout_minutes=timeout_s / 60,
        )
    set_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (for clean exits and tests)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
