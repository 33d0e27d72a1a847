"""AdamW through megatron-core's optimizer factory, and its LR/WD scheduler.

``get_megatron_optimizer`` builds the DistributedOptimizer (ZeRO-1 over the DP group, fp32 main
params for bf16 runs, grad clipping across TP/PP); per-group overrides give the adapter and the
VM head their own peak LR. The schedule is megatron's ``OptimizerParamScheduler`` stepped once
per optimizer step, so its state (``num_steps``) round-trips through the checkpoint.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from pipeline.config import TrainConfig, warmup_iters

# Name patterns of the parameter groups with an optional separate LR (model module names).
ADAPTER_PARAMS = ("*adapter*",)
VM_HEAD_PARAMS = ("*vm_head*",)


def _no_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Biases and norm weights: no weight decay (as LLaVA / Megatron-LM)."""
    return param.ndim == 1 or name.endswith(".bias")


def build_optimizer(cfg: TrainConfig, model_chunks: List[torch.nn.Module]):
    """AdamW over the trainable parameters of ``model_chunks`` (DDP-wrapped megatron modules)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is AdamW (decoupled_weight_decay=True)
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=cfg.precision.bf16,
        params_dtype=torch.bfloat16 if cfg.precision.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    overrides: Dict = {
        ParamKey(with_name_predicate=ParamWithNamePredicate("no_decay", _no_decay)):
            ParamGroupOverride(wd_mult=0.0),
    }
    if o.adapter_lr is not None:
        overrides[ParamKey(name=ADAPTER_PARAMS)] = ParamGroupOverride(
            max_lr=o.adapter_lr, min_lr=o.min_lr * o.adapter_lr / o.lr)
    if o.vm_head_lr is not None:
        overrides[ParamKey(name=VM_HEAD_PARAMS)] = ParamGroupOverride(
            max_lr=o.vm_head_lr, min_lr=o.min_lr * o.vm_head_lr / o.lr)
    return get_megatron_optimizer(opt_cfg, model_chunks, config_overrides=overrides)


def build_scheduler(cfg: TrainConfig, optimizer):
    """Linear warmup from 0, then cosine/linear decay to ``min_lr`` (or constant)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay = o.decay_iters or cfg.train.train_iters
    warmup = warmup_iters(cfg)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )
