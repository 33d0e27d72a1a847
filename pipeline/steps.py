"""One step's micro-batches: pulled off the loader, fanned out to the pipeline stages, run
through megatron's forward/backward schedule.

Unpacked, a step is ``num_microbatches`` loader items; packed, one loader item holds the whole
step (its micro-batch count depends on the data). Only the first and last pipeline stages read
data; middle stages get ``None`` per micro-batch, or, packed and with PP > 2, each packed
micro-batch's ``PackedSequence`` from the first stage (their attention needs the document
boundaries).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_vwlmm.model.forward_step import TokenTotals

COUNT_KEYS = ("samples", "images", "lm_tokens", "vm_positions", "useful_positions",
              "computed_positions", "attention_square")


@dataclass
class Step:
    """One optimizer step's micro-batches on this rank.

    ``batches``: VWLMMBatch on the stages that read data; on middle pipeline stages None per
    micro-batch, or the PackedSequence of each packed micro-batch. ``counts``: what the batches
    hold (zeros off the data stages), summed over DP by ``StepData.global_counts``.
    """

    batches: list
    keys: list
    counts: Dict[str, int]

    @property
    def num_microbatches(self) -> int:
        return len(self.batches)


def _batch_counts(batches) -> Dict[str, int]:
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for b in batches:
        lengths = b.sample_lengths
        counts["samples"] += b.num_samples
        counts["images"] += b.num_images
        counts["lm_tokens"] += b.num_lm_tokens
        counts["vm_positions"] += b.num_vm_positions
        counts["useful_positions"] += int(lengths.sum())
        counts["computed_positions"] += b.num_positions
        counts["attention_square"] += int((lengths * lengths).sum())
    return counts


class StepData:
    """Pulls a step's micro-batches off a loader iterator and fans them out to this stage."""

    def __init__(self, loader_iter, needs_data: bool, device: torch.device,
                 packing: bool) -> None:
        self.loader_iter, self.needs_data = loader_iter, needs_data
        self.device, self.packing = device, packing

    def next_step(self, num_microbatches: int) -> Step:
        batches, keys = [], []
        if self.needs_data and self.packing:
            batches, keys = next(self.loader_iter)
        elif self.needs_data:
            for _ in range(num_microbatches):
                batch, batch_keys = next(self.loader_iter)
                batches.append(batch)
                keys.extend(batch_keys)
        counts = _batch_counts(batches) if self.needs_data else dict.fromkeys(COUNT_KEYS, 0)
        batches = [b.to(self.device) for b in batches]
        if self.packing:
            batches = _share_packing_with_middle_stages(batches, self.needs_data, self.device)
        elif not self.needs_data:
            batches = [None] * num_microbatches
        return Step(batches, keys, counts)

    def global_counts(self, step: Step) -> Dict[str, int]:
        """The step's counts summed over data-parallel ranks (zeros off the data stages)."""
        if not self.needs_data:
            return dict(step.counts)
        from megatron.core import parallel_state as ps

        t = torch.tensor([float(step.counts[k]) for k in COUNT_KEYS], dtype=torch.float64)
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
        return {k: int(v) for k, v in zip(COUNT_KEYS, t.tolist())}


def _share_packing_with_middle_stages(batches: list, needs_data: bool, device) -> list:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() <= 2:
        return batches  # every stage is a first or a last one: all read the data
    payload = [[b.packing.to("cpu") for b in batches] if ps.is_pipeline_first_stage(
        ignore_virtual=True) else None]
    dist.broadcast_object_list(payload, src=ps.get_pipeline_model_parallel_first_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    if needs_data:
        return batches
    return [packing.to(device) for packing in payload[0]]


def schedule_shape(packing: bool, micro_batch_size: int, seq_length: int) -> tuple[int, int]:
    """(seq_length, micro_batch_size) of the activations pipeline stages exchange: a packed
    micro-batch is one sequence of all its rows."""
    if packing:
        return micro_batch_size * seq_length, 1
    return seq_length, micro_batch_size


def _forward_step_func(data_iterator, model, token_totals=None):
    """megatron's forward_step_func: the batch is already on the device (None, or only the
    packing layout, off the first and last stages)."""
    from megatron_vwlmm.model.forward_step import forward_step

    return forward_step(next(data_iterator) if data_iterator is not None else None, model,
                        token_totals)


class Schedule:
    """megatron's forward/backward schedule (no pipelining, 1F1B or interleaved) over the
    model chunks of this rank."""

    def __init__(self, chunks: list, shape: tuple[int, int]) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.chunks, self.shape = chunks, shape
        self.fwd_bwd = get_forward_backward_func()

    def run(self, step: Step, forward_only: bool,
            token_totals: Optional[TokenTotals] = None) -> List[dict]:
        """The micro-batches' ``loss_func`` metrics (on the last stage; empty elsewhere)."""
        iters = [iter(step.batches) for _ in self.chunks]
        single = len(self.chunks) == 1
        return self.fwd_bwd(
            forward_step_func=functools.partial(_forward_step_func, token_totals=token_totals),
            data_iterator=iters[0] if single else iters,
            model=self.chunks[0] if single else self.chunks,
            num_microbatches=step.num_microbatches, seq_length=self.shape[0],
            micro_batch_size=self.shape[1], forward_only=forward_only) or []
