"""Validation during training: forward-only passes over the held-out split.

Losses are token-weighted over all of the validation batches (independent of packing and of
the training loss normalisation), reduced where the training losses are
(``megatron_vwlmm/model/forward_step.py``).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_vwlmm.model.forward_step import reduce_step_losses
from pipeline.steps import Schedule, StepData


class Validator:
    """Decides when to validate and runs it (every rank calls ``validate``)."""

    def __init__(self, interval: int, iters: int, enabled: bool, lambda_vm: float) -> None:
        self.interval, self.iters = interval, iters
        self.enabled = enabled and interval > 0
        self.lambda_vm = lambda_vm

    def should_validate(self, iteration: int) -> bool:
        return self.enabled and iteration % self.interval == 0

    def validate(self, chunks: list, schedule: Schedule, data: StepData,
                 num_microbatches: int) -> Dict[str, float]:
        """Validation losses on the last pipeline stage ({} elsewhere)."""
        from megatron.core import parallel_state as ps

        for c in chunks:
            c.eval()
        collected: List[Dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for _ in range(self.iters):
                collected.extend(schedule.run(data.next_step(num_microbatches),
                                              forward_only=True))
        for c in chunks:
            c.train()
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return {}
        return reduce_step_losses(collected, self.lambda_vm, token_weighted=True,
                                  dp_group=ps.get_data_parallel_group(with_context_parallel=True))
