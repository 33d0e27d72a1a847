"""megatron-core's real DDP + DistributedOptimizer step at DP=2 on CPU (gloo) equals DP=1.

Also: frozen parts (the vision encoder) get no gradient, no grad-buffer slot and no optimizer
state, and do not move.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.model import cases


def _train_one_step(distributed_optimizer: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.forward_step import forward_step
    from megatron_vwlmm.parallel.stage_replicas import finalize_model_grads

    config = cases.tiny_config()
    model = build_model(config)
    cases.perturb_(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
        [ddp],
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    samples = cases.raw_samples()
    per_rank = len(samples) // dp_size
    mine = samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    batches = [cases.batch(mine[i:i + 2], config) for i in range(0, len(mine), 2)]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(next(it), m),
        data_iterator=iter(batches), model=[ddp], num_microbatches=len(batches),
        seq_length=cases.SEQ, micro_batch_size=2, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    buffered = set()
    for buffer in ddp.buffers:
        buffered.update(id(p) for p in buffer.param_index_map)
    vision = dict(model.vision_model.named_parameters())
    return {
        "ok": bool(ok),
        "grad_norm": float(grad_norm),
        "losses": [float(d["total_loss"]) for d in losses],
        "after": {n: p.detach().clone() for n, p in model.named_parameters()},
        "before": before,
        "vision_in_buffers": any(id(p) in buffered for p in vision.values()),
        "vision_grads": [p.grad for p in vision.values()]
                        + [getattr(p, "main_grad", None) for p in vision.values()],
        "trainable_in_buffers": all(id(p) in buffered for p in model.parameters()
                                    if p.requires_grad),
    }


@pytest.fixture(scope="module")
def steps():
    reference = run_on_ranks(_train_one_step, 1, args=(False,))[0]
    dp2 = run_on_ranks(_train_one_step, 2, args=(True,))
    return reference, dp2


def test_dp2_distributed_optimizer_step_equals_dp1(steps):
    reference, dp2 = steps
    assert reference["ok"] and all(r["ok"] for r in dp2)
    assert dp2[0]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    moved = 0
    for name, ref_after in reference["after"].items():
        for rank_result in dp2:  # both ranks hold the full, identical updated weights
            torch.testing.assert_close(rank_result["after"][name], ref_after,
                                       rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(ref_after, reference["before"][name]))
    assert moved >= 30  # the step really changed every trainable tensor


def test_frozen_vision_has_no_grad_no_buffer_and_does_not_move(steps):
    reference, dp2 = steps
    for result in (reference, *dp2):
        assert not result["vision_in_buffers"]
        assert all(g is None for g in result["vision_grads"])
        assert result["trainable_in_buffers"]
        for name, value in result["after"].items():
            if name.startswith("vision_model."):
                assert torch.equal(value, result["before"][name]), name
