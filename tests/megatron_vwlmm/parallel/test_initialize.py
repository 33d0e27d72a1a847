"""initialize_distributed: the model-parallel groups honour the configured collective timeout.

A rank whose TP peer is alive but never joins a collective (as when the peer's node died
without closing its connections) must fail after ``timeout_s``, not after megatron's default of
30 minutes for the groups it creates; the Slurm scripts' dead-node bound rests on it.
"""

from __future__ import annotations

import time

from megatron_vwlmm.parallel.launch import run_on_ranks

TIMEOUT_S = 1
PEER_SILENT_S = 5  # the silent peer exits after this; a rank still waiting then fails anyway


def _tp_collective_with_a_silent_peer():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.parallel.initialize import initialize_distributed

    ps.destroy_model_parallel()  # run_on_ranks initialised with its own timeout
    initialize_distributed(tp=2, timeout_s=TIMEOUT_S)
    if ps.get_tensor_model_parallel_rank() == 1:
        time.sleep(PEER_SILENT_S)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=ps.get_tensor_model_parallel_group())
    except RuntimeError as exc:
        return time.monotonic() - start, str(exc)
    return time.monotonic() - start, "all_reduce returned"


def test_tp_collective_times_out_after_timeout_s():
    (waited, error), _ = run_on_ranks(_tp_collective_with_a_silent_peer, 2, tp=2)
    assert "Timed out" in error, error
    assert waited < PEER_SILENT_S - 1, (waited, error)
