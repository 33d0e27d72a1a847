"""The megatron compatibility fixes on the installed megatron-core release.

``fully_reshardable_offsets``: with a grad buffer of several buckets, the distributed
optimizer's fully-reshardable state for every parameter is the parameter's own main copy and
moments (fp32 model: main param == model param after a step); without the fix, parameters after
the first bucket are shifted and zero-filled (asserted too, so the test shows what it guards).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_vwlmm.parallel import megatron_compat
from megatron_vwlmm.parallel.launch import run_on_ranks

REPO = Path(__file__).resolve().parents[3]


def _optimizer_state_vs_params():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vwlmm.model import build_model, get_preset

    model = build_model(get_preset("tiny"), pre_process=True, post_process=True)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True,
            overlap_grad_reduce=True, bucket_size=40_000))
    chained = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    (optimizer,) = chained.chained_optimizers
    torch.manual_seed(0)
    for param in model.parameters():
        if param.requires_grad:
            param.main_grad.normal_()
    chained.step()
    buckets = len(ddp.buffers[0].buckets)
    model_sd = model.sharded_state_dict()
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}
    # param_state's entries follow the buffers' parameter order (megatron's own iteration).
    in_order = [p for buffer in optimizer.buffers for p in buffer.param_index_map]

    def wrong_keys(state):
        wrong = []
        for index, model_param in enumerate(in_order):
            saved = state["param_state"][index]["param"]
            if not torch.equal(saved.data, model_param.detach()):
                wrong.append(saved.key)
        return wrong

    unpatched = wrong_keys(optimizer.sharded_state_dict(model_sd, metadata=meta))
    with megatron_compat.fully_reshardable_offsets(optimizer):
        patched = wrong_keys(optimizer.sharded_state_dict(model_sd, metadata=meta))
    return buckets, unpatched, patched


def test_fully_reshardable_state_of_every_bucket_is_the_parameters_own():
    for buckets, unpatched, patched in run_on_ranks(_optimizer_state_vs_params, 2):
        assert buckets > 2
        assert patched == [], f"optimizer state differs from the parameter for {patched}"
        assert unpatched, "megatron saved every bucket right: the fix may no longer be needed"


def test_verified_range_is_setup_py_requirement():
    """Widening megatron-core in setup.py means re-checking megatron_compat.py first."""
    text = (REPO / "setup.py").read_text()
    low, high = re.search(r'"megatron-core>=([\d.]+),<([\d.]+)"', text).groups()
    assert (low, high) == megatron_compat.VERIFIED_RANGE
