"""The model chunks of this rank, wrapped for megatron's DDP, and the hooks megatron's schedules
read from the model config (as Megatron-LM's ``training.py`` sets them)."""

from __future__ import annotations

from typing import List

import torch

from pipeline.config import TrainConfig


def build_model_chunks(cfg: TrainConfig) -> List[torch.nn.Module]:
    """One VWLMMModel per virtual stage, on the device, wrapped in megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_vwlmm.model import build_model

    model_cfg, runtime = cfg.model.vwlmm(), cfg.runtime()
    chunks = []
    for vp in range(cfg.parallel.vpp or 1):
        vp_stage = vp if cfg.parallel.vpp else None
        model = build_model(
            model_cfg,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, runtime=runtime)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [
        DistributedDataParallel(config=m.config, ddp_config=ddp_cfg, module=m,
                                disable_bucketing=i > 0)
        for i, m in enumerate(chunks)
    ]


def wire_schedule_config(chunks, optimizer, cfg: TrainConfig) -> None:
    """Hooks megatron's schedules read from the model config."""
    from megatron_vwlmm.parallel.stage_replicas import finalize_model_grads

    config = chunks[0].module.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_grad_reduce:
        grad_sync = [c.start_grad_sync for c in chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if cfg.parallel.overlap_param_gather:
        param_sync = [c.start_param_sync for c in chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
