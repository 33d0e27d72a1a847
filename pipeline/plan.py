"""``vwlmm-train --plan``: will this run fit in GPU memory, and if not, what is the smallest change
that makes it fit? Answered in milliseconds, without a GPU or a process group.

Per pipeline stage (and data-parallel rank where they differ) the planner adds up:

- parameters, gradients and optimizer state, from the chunk's parameter list
  (``megatron_vwlmm/model/memory.py``: frozen parts and the stage replicas of
  ``docs/ARCHITECTURE.md`` section 3 included) laid out as megatron's DDP lays out its buffers
  (megatron-core's ``_ParamAndGradBuffer``: reverse order, one buffer of fp32
  gradients since ``pipeline/model_setup.py`` sets ``grad_reduce_in_fp32``; under the
  distributed optimizer each parameter starts on a multiple of 64 elements, each bucket ends on a
  multiple of lcm(DP, 128), each stage replica is a bucket of its own, and each DP rank owns an
  equal slice of every bucket). Adam keeps ``exp_avg`` and ``exp_avg_sq`` in fp32 and, for bf16
  runs, an fp32 master copy, for the slice it owns (the whole model without the distributed
  optimizer). These are exact: ``tests/pipeline/test_plan.py`` compares them with the tensors of
  real models on gloo ranks;
- activations: one micro-batch's saved tensors (``memory.activation_bytes``) times the
  micro-batches a stage holds at once: ``pp - stage`` in 1F1B, megatron's warm-up count
  ``2 (pp - stage - 1) + (vpp - 1) pp + 1`` chunk-micro-batches interleaved, one without
  pipelining; the last stage's heads hold one;
- a workspace for what lives only during an operation: the logits' bf16 copy and their fp32
  gradient, the KL's chunk buffers, one layer's backward (and its recomputation).

A layout fits when its peak stays under ``usable`` of the card's memory: the rest is the CUDA
context, NCCL's buffers and the caching allocator's fragmentation, none of which the model sets.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_vwlmm.model.memory import (
    FP32,
    MicroBatchShape,
    ParamTensor,
    activation_bytes,
    chunk_parameters,
    decoder_layer_bytes,
)
from pipeline.config import ConfigError, TrainConfig
from pipeline.flops import (adapter_forward_flops, decoder_forward_flops, step_flops,
                            vision_forward_flops)

GIB = 1 << 30
# Fraction of a card's memory the planner lets the model use (see the module docstring).
USABLE = 0.9
# Achieved fraction of the peak matmul rate when the GPU computes (big bf16 GEMMs on H100 reach
# 60-70% of dense peak; attention and elementwise kernels less): the step time's one assumption.
KERNEL_EFFICIENCY = 0.55
_DEFAULT_BUCKET = 40_000_000  # megatron DDP's bucket_size floor with overlap_grad_reduce


def parse_bytes(text: str) -> int:
    """``80GiB``, ``40GB`` (read as GiB: cards are sold by binary size), ``81920MiB``, bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GiB or 40GB")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024 ** power)


# --------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer
# --------------------------------------------------------------------------------------------


@dataclass
class StateBytes:
    """One rank's model state: parameters, fp32 gradient buffer, optimizer (master + moments)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def _buffer_layout(params: Sequence[ParamTensor], *, dp: int, distributed: bool,
                   bucket_size: Optional[int]) -> Tuple[int, List[Tuple[int, int]],
                                                        List[Tuple[int, int]]]:
    """megatron's ``_ParamAndGradBuffer`` index arithmetic over the trainable ``params``:
    (buffer numel, buckets as (start, end), each parameter's (start, end)), in buffer order."""
    bucket_div = math.lcm(dp, 128)
    start = bucket_start = end = 0
    buckets: List[Tuple[int, int]] = []
    ranges: List[Tuple[int, int]] = []
    open_bucket = False

    def close(at: int) -> int:
        nonlocal bucket_start, open_bucket
        stop = _pad(at, bucket_div) if distributed else at
        buckets.append((bucket_start, stop))
        bucket_start, open_bucket = stop, False
        return stop

    for p in reversed(params):
        if distributed:
            start = _pad(start, 64)
        own_bucket = p.stage_replica and distributed
        if own_bucket and open_bucket:
            start = close(start)
        end = start + p.numel
        ranges.append((start, end))
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if open_bucket:
        close(end)
    return (buckets[-1][1] if buckets else 0), buckets, ranges


def chunk_state(params: Sequence[ParamTensor], *, dp: int, dp_rank: int, distributed: bool,
                bf16: bool, bucket_size: Optional[int]) -> StateBytes:
    """Bytes of one DDP-wrapped chunk on one rank."""
    pbytes = 2 if bf16 else 4
    trainable = [p for p in params if p.trainable]
    frozen = sum(p.numel for p in params if not p.trainable) * pbytes
    numel, buckets, ranges = _buffer_layout(trainable, dp=dp, distributed=distributed,
                                            bucket_size=bucket_size)
    per_element = 2 * FP32 + (FP32 if bf16 else 0)  # exp_avg, exp_avg_sq (+ fp32 master)
    if not distributed:
        owned = sum(p.numel for p in trainable)
        return StateBytes(frozen + owned * pbytes, numel * FP32, owned * per_element)
    owned = 0
    for lo, hi in buckets:
        shard = (hi - lo) // dp
        mine = (lo + dp_rank * shard, lo + (dp_rank + 1) * shard)
        owned += sum(max(0, min(e, mine[1]) - max(s, mine[0])) for s, e in ranges
                     if lo <= s < hi)
    # The param buffer holds every trainable parameter, padding included.
    return StateBytes(frozen + numel * pbytes, numel * FP32, owned * per_element)


@dataclass(frozen=True)
class Chunk:
    """One virtual stage of a pipeline rank."""

    pre_process: bool
    post_process: bool
    num_layers: int
    first_layer: int


def stage_chunks(cfg: TrainConfig, pp_rank: int) -> List[Chunk]:
    """The chunks pipeline rank ``pp_rank`` builds (``pipeline/model_setup.py``)."""
    pp, vpp = cfg.parallel.pp, cfg.parallel.vpp or 1
    per_chunk = cfg.model.decoder.num_layers // (pp * vpp)
    return [Chunk(pre_process=pp_rank == 0 and vp == 0,
                  post_process=pp_rank == pp - 1 and vp == vpp - 1,
                  num_layers=per_chunk,
                  first_layer=(vp * pp + pp_rank) * per_chunk) for vp in range(vpp)]


def rank_state(cfg: TrainConfig, dp: int, pp_rank: int, dp_rank: int) -> StateBytes:
    """Model-state bytes of a rank of pipeline stage ``pp_rank`` and data-parallel rank
    ``dp_rank`` (every TP rank of a stage holds the same)."""
    p = cfg.parallel
    total = StateBytes()
    for index, chunk in enumerate(stage_chunks(cfg, pp_rank)):
        params = chunk_parameters(cfg.model, tp=p.tp, pp=p.pp, pre_process=chunk.pre_process,
                                  post_process=chunk.post_process, num_layers=chunk.num_layers,
                                  first_layer=chunk.first_layer)
        # megatron DDP buckets only the first chunk of the first stage, with overlap on.
        bucketed = p.overlap_grad_reduce and pp_rank == 0 and index == 0
        state = chunk_state(params, dp=dp, dp_rank=dp_rank, distributed=p.use_distributed_optimizer,
                            bf16=cfg.precision.bf16,
                            bucket_size=max(_DEFAULT_BUCKET, 1_000_000 * dp) if bucketed else None)
        total = StateBytes(total.params + state.params, total.grads + state.grads,
                           total.optimizer + state.optimizer)
    return total


# --------------------------------------------------------------------------------------------
# Activations and the peak
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the data puts in a micro-batch: image rows per row (memory), and the spliced
    positions and images of a mean sample (step time, micro-batches of a packed step)."""

    images_per_row: int
    sample_positions: int
    images_per_sample: float
    source: str = "assumed"

    @classmethod
    def default(cls, cfg: TrainConfig) -> "Workload":
        """Padded: one one-image sample per row (the LLaVA-1.5 data has at most one image per
        sample), the row full; packed: as many one-image samples as fit a row (the most image
        positions, the KL's worst case)."""
        seq, patches = cfg.model.decoder.seq_length, cfg.model.num_patches
        if cfg.data.packing:
            per_row = max(1, seq // patches)
            return cls(per_row, seq // per_row, 1.0)
        images = 1 if seq > patches else 0
        return cls(images, seq, float(images))

    @classmethod
    def from_manifest(cls, cfg: TrainConfig, manifest) -> "Workload":
        """The dataset's mean sample (``manifest.json``'s statistics: spliced positions, images
        per sample); packed rows hold as many mean samples as fit."""
        stats, samples = manifest.statistics, max(1, manifest.num_samples)
        seq = cfg.model.decoder.seq_length
        positions = max(1, min(seq, round(stats.mean_tokens)))
        images = stats.num_images / samples
        per_row = max(1, seq // positions) if cfg.data.packing else 1
        return cls(math.ceil(per_row * images), positions, images, "the dataset's manifest")


def workload(cfg: TrainConfig) -> Workload:
    """The dataset's workload when ``data.path`` holds a finished dataset, else the default."""
    from pipeline.validate import load_manifest
    from vwlmm_data.storage import S3Options, exists, join

    d = cfg.data
    s3 = S3Options(d.s3_endpoint_url, d.s3_region)
    if d.path and exists(join(d.path, "manifest.json"), s3):
        return Workload.from_manifest(cfg, load_manifest(d.path, s3))
    return Workload.default(cfg)


def micro_batch_shape(cfg: TrainConfig, work: Workload) -> MicroBatchShape:
    rows = cfg.data.micro_batch_size
    images = rows * work.images_per_row * cfg.model.num_patches
    return MicroBatchShape(rows=rows, seq_length=cfg.model.decoder.seq_length,
                           image_positions=images, kl_positions=images, packed=cfg.data.packing)


def micro_batches_per_step(cfg: TrainConfig, dp: int, work: Workload) -> int:
    d = cfg.data
    if not d.packing:
        return d.global_batch_size // (d.micro_batch_size * dp)
    samples_per_row = max(1, cfg.model.decoder.seq_length // work.sample_positions)
    return max(1, math.ceil(d.global_batch_size / dp / samples_per_row / d.micro_batch_size))


def in_flight(cfg: TrainConfig, pp_rank: int, micro_batches: int) -> int:
    """Chunk-micro-batches whose activations a stage holds at its peak (megatron's schedules:
    ``forward_backward_pipelining_with(out)_interleaving``'s warm-up plus one)."""
    pp, vpp = cfg.parallel.pp, cfg.parallel.vpp
    if pp == 1:
        return 1
    if vpp is None:
        return min(pp - pp_rank, micro_batches)
    return min(micro_batches * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)


@dataclass
class StageMemory:
    """The planner's answer for one pipeline stage."""

    pp_rank: int
    state: StateBytes  # the DP rank holding the most
    activations_per_micro_batch: Dict[str, int]
    in_flight: int
    activations: int
    workspace: int

    @property
    def peak(self) -> int:
        return self.state.total + self.activations + self.workspace


def stage_memory(cfg: TrainConfig, dp: int, pp_rank: int, work: Workload) -> StageMemory:
    p, model = cfg.parallel, cfg.model
    act = 2 if cfg.precision.bf16 else 4
    shape = micro_batch_shape(cfg, work)
    micro = micro_batches_per_step(cfg, dp, work)
    flight = in_flight(cfg, pp_rank, micro)
    recompute = p.recompute_granularity
    chunks = stage_chunks(cfg, pp_rank)
    # Chunk-micro-batches per chunk: spread over the stage's chunks (one each without vpp).
    per_chunk_parts: Dict[str, int] = {}
    total = 0
    for chunk in chunks:
        parts = activation_bytes(model, shape, tp=p.tp, num_layers=chunk.num_layers,
                                 pre_process=chunk.pre_process, post_process=chunk.post_process,
                                 recompute=recompute, act_bytes=act,
                                 sequence_parallel=p.sequence_parallel,
                                 recompute_vision=p.recompute_vision)
        copies = math.ceil(flight / len(chunks))
        for name, value in parts.items():
            # The heads run forward and backward back to back: one micro-batch in flight.
            n = 1 if chunk.post_process and name not in ("decoder layers",) else copies
            per_chunk_parts[name] = per_chunk_parts.get(name, 0) + value
            total += n * value
    state = max((rank_state(cfg, dp, pp_rank, r) for r in _dp_ranks_to_check(dp)),
                key=lambda s: s.total)
    layer = decoder_layer_bytes(model, shape, tp=p.tp, recompute=None, act_bytes=act,
                                sequence_parallel=p.sequence_parallel)
    workspace = 2 * layer  # one layer's gradients and (recomputed) activations in backward
    if chunks[-1].post_process:
        logits = shape.positions * (model.decoder.vocab_size // p.tp)
        kl_rows = min(shape.kl_positions, max(1, (1 << 24) // (model.decoder.vocab_size // p.tp)))
        workspace += logits * (act + FP32) + 4 * kl_rows * (model.decoder.vocab_size // p.tp) * FP32
    return StageMemory(pp_rank, state, per_chunk_parts, flight, total, workspace)


def _dp_ranks_to_check(dp: int) -> Iterator[int]:
    """DP ranks differ only by the alignment padding that falls in their slices (a few KB):
    the larger of the first and the last (which holds each bucket's end padding) is taken."""
    return iter(sorted({0, dp - 1}))


# --------------------------------------------------------------------------------------------
# The plan: verdict, step time, what to change
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: TrainConfig
    gpus: int
    gpu_memory: int
    dp: int
    stages: List[StageMemory]
    work: Workload
    step_time_s: Optional[float] = None
    mfu: Optional[float] = None

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= USABLE * self.gpu_memory


def layout_error(cfg: TrainConfig, gpus: int) -> Optional[str]:
    """Why the trainer would refuse this layout at ``gpus`` processes, or None."""
    from pipeline.validate import check_layout, check_model

    try:
        check_layout(cfg, gpus)
        check_model(cfg.model.vwlmm(), cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def plan(cfg: TrainConfig, gpus: int, gpu_memory: int, *, work: Optional[Workload] = None,
         peak_tflops: Optional[float] = None) -> Plan:
    """The memory of every stage of ``cfg`` on ``gpus`` cards; raises ConfigError for a layout
    the trainer would refuse."""
    error = layout_error(cfg, gpus)
    if error:
        raise ConfigError(error)
    work = work or Workload.default(cfg)
    dp = gpus // (cfg.parallel.tp * cfg.parallel.pp)
    stages = [stage_memory(cfg, dp, r, work) for r in range(cfg.parallel.pp)]
    result = Plan(cfg, gpus, gpu_memory, dp, stages, work)
    if peak_tflops:
        result.step_time_s, result.mfu = step_time(cfg, gpus, dp, work, peak_tflops)
    return result


def step_time(cfg: TrainConfig, gpus: int, dp: int, work: Workload,
              peak_tflops: float) -> Tuple[float, float]:
    """(seconds per step, MFU): the FLOPs the GPUs execute (``pipeline/flops.py``'s useful work,
    plus padding, recomputation and the last stage's vision encoder and adapter copy) at
    ``KERNEL_EFFICIENCY`` of the peak, stretched by the pipeline bubble
    ``(pp - 1) / (micro-batches x vpp)``; MFU counts the useful work only, as the trainer does."""
    model, d, p = cfg.model, cfg.data, cfg.parallel
    samples, useful_row = d.global_batch_size, work.sample_positions
    images = round(samples * work.images_per_sample)
    useful = step_flops(model, samples * useful_row, samples * useful_row ** 2, images)
    row = useful_row if d.packing else model.decoder.seq_length  # padded rows compute padding
    executed = step_flops(model, samples * row, samples * row ** 2, images)
    if p.recompute_granularity == "full":  # one more forward of the layers (not the LM head)
        executed += decoder_forward_flops(model, samples * row, samples * row ** 2) \
            - 2 * samples * row * model.decoder.hidden_size * model.decoder.vocab_size
    if p.pp > 1:  # the last stage's encoder and adapter copy
        executed += images * (vision_forward_flops(model) + 3 * adapter_forward_flops(model))
    micro = micro_batches_per_step(cfg, dp, work)
    bubble = (p.pp - 1) / (micro * (p.vpp or 1))
    seconds = executed / (gpus * peak_tflops * 1e12 * KERNEL_EFFICIENCY) * (1 + bubble)
    return seconds, useful / (seconds * gpus * peak_tflops * 1e12)


def _variants(cfg: TrainConfig, gpus: int) -> Iterator[Tuple[List[str], TrainConfig]]:
    """Layouts near ``cfg``: TP, PP, sequence parallelism, recompute and micro-batch changes,
    with the ``--set`` arguments that select each."""
    p, d = cfg.parallel, cfg.data
    # Only changes that lower the memory: more TP or PP, sequence parallelism (with TP), more
    # recompute, smaller micro-batches.
    tps = [t for t in (1, 2, 4, 8) if p.tp <= t <= gpus] or [p.tp]
    pps = [q for q in (1, 2, 4, 8) if p.pp <= q <= gpus] or [p.pp]
    recomputes = [(None, None), ("selective", None), ("full", "uniform")]
    order = [g for g, _ in recomputes]
    recomputes = recomputes[order.index(p.recompute_granularity):] \
        if p.recompute_granularity in order else recomputes
    micro = sorted({d.micro_batch_size, *[m for m in (1, 2, 4, 8, 16, 32)
                                          if m <= d.micro_batch_size]}, reverse=True)
    sps = [p.sequence_parallel] if p.sequence_parallel else [False, True]
    for tp, pp, sp, (granularity, method), mbs in itertools.product(tps, pps, sps, recomputes,
                                                                     micro):
        if sp and tp < 2:
            continue
        sets = []
        if tp != p.tp:
            sets.append(f"parallel.tp={tp}")
        if pp != p.pp:
            sets.append(f"parallel.pp={pp}")
        if sp != p.sequence_parallel:
            sets.append("parallel.sequence_parallel=true")
        if granularity != p.recompute_granularity:
            sets.append(f"parallel.recompute_granularity={granularity or 'null'}")
            if granularity == "full":
                sets.append("parallel.recompute_method=uniform")
        if mbs != d.micro_batch_size:
            sets.append(f"data.micro_batch_size={mbs}")
        try:
            variant = dataclasses.replace(
                cfg, parallel=dataclasses.replace(
                    p, tp=tp, pp=pp, vpp=p.vpp if pp > 1 else None,
                    sequence_parallel=sp, recompute_granularity=granularity,
                    recompute_method=method if granularity == "full" else None),
                data=dataclasses.replace(d, micro_batch_size=mbs))
        except ConfigError:
            continue
        yield sets, variant


def suggestions(cfg: TrainConfig, gpus: int, gpu_memory: int, *, work: Optional[Workload] = None,
                limit: int = 3) -> List[Tuple[List[str], Plan]]:
    """The layouts that fit with the fewest changed settings; among those, the fastest
    (fewer model-parallel ranks, no recompute, bigger micro-batches)."""
    found = []
    for sets, variant in _variants(cfg, gpus):
        if not sets or layout_error(variant, gpus):
            continue
        result = plan(variant, gpus, gpu_memory, work=work)
        if result.fits:
            found.append((sets, result))
    recompute_cost = {None: 0, "selective": 1, "full": 2}

    def cost(item):
        sets, result = item
        p = result.cfg.parallel
        knobs = {s.split("=")[0] for s in sets} - {"parallel.recompute_method"}
        return (len(knobs), recompute_cost[p.recompute_granularity] > 1, p.tp * p.pp,
                recompute_cost[p.recompute_granularity], -result.cfg.data.micro_batch_size,
                result.peak)
    # The best layout per set of changed settings: one line per kind of change.
    best: Dict[Tuple[str, ...], Tuple[List[str], Plan]] = {}
    for item in sorted(found, key=cost):
        best.setdefault(tuple(s.split("=")[0] for s in item[0]), item)
    return sorted(best.values(), key=cost)[:limit]


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def report(result: Plan, fixes: Sequence[Tuple[List[str], Plan]] = ()) -> str:
    """What ``--plan`` prints."""
    cfg, p = result.cfg, result.cfg.parallel
    lines = [f"plan: {result.gpus} GPUs x {_gib(result.gpu_memory)} GiB = TP {p.tp} x PP {p.pp}"
             + (f" (x {p.vpp} virtual)" if p.vpp else "") + f" x DP {result.dp}; "
             f"{'bf16' if cfg.precision.bf16 else 'fp32'}, "
             f"{'distributed' if p.use_distributed_optimizer else 'replicated'} optimizer, "
             f"recompute {p.recompute_granularity or 'none'}"
             + (", sequence parallel" if p.sequence_parallel else ""),
             f"micro-batch: {cfg.data.micro_batch_size} "
             + ("packed row(s)" if cfg.data.packing else "padded row(s)")
             + f" of {cfg.model.decoder.seq_length} positions, "
             f"{result.work.images_per_row} image(s) of {cfg.model.num_patches} patches per row; "
             f"samples of ~{result.work.sample_positions} positions, "
             f"{result.work.images_per_sample:.2f} image(s) each ({result.work.source})",
             "GiB per rank       params    grads  optimizer  act/micro  in-flight  activations"
             "  workspace     peak"]
    for s in result.stages:
        per_mb = sum(s.activations_per_micro_batch.values())
        lines.append(f"stage {s.pp_rank:<3}        {_gib(s.state.params):>8} "
                     f"{_gib(s.state.grads):>8} {_gib(s.state.optimizer):>10} "
                     f"{_gib(per_mb):>10} {s.in_flight:>10} {_gib(s.activations):>12} "
                     f"{_gib(s.workspace):>10} {_gib(s.peak):>8}")
    for s in result.stages:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in s.activations_per_micro_batch.items() if v)
        lines.append(f"stage {s.pp_rank} activations per micro-batch: {parts}")
    if result.step_time_s is not None:
        lines.append(f"step: ~{result.step_time_s:.2f} s, MFU ~{result.mfu:.0%} "
                     f"(at {KERNEL_EFFICIENCY:.0%} of peak while computing, pipeline bubble "
                     "included)")
    budget = USABLE * result.gpu_memory
    if result.fits:
        lines.append(f"verdict: fits (peak {_gib(result.peak)} GiB of {_gib(budget)} GiB usable)")
    else:
        lines.append(f"verdict: does not fit (peak {_gib(result.peak)} GiB > {_gib(budget)} GiB "
                     "usable)")
        if fixes:
            lines.append("smallest changes that fit:")
            for sets, fixed in fixes:
                lines.append(f"  {' '.join('--set ' + s for s in sets)}  "
                             f"(peak {_gib(fixed.peak)} GiB)")
        else:
            lines.append("no change of TP, PP, SP, recompute or micro-batch fits: add GPUs or "
                         "use cards with more memory")
    return "\n".join(lines)


def recommend(cfg: TrainConfig, gpus: int, gpu_memory: int) -> Tuple[str, str]:
    """(verdict, layout) for the README's table: the config as is when it fits, else the first
    suggestion."""
    if layout_error(cfg, gpus) is None:
        result = plan(cfg, gpus, gpu_memory)
        if result.fits:
            return "fits as is", _layout(result)
    fixes = suggestions(cfg, gpus, gpu_memory, limit=1)
    if not fixes:
        return "does not fit", "-"
    sets, fixed = fixes[0]
    return "fits with " + ", ".join(f"`{s}`" for s in sets), _layout(fixed)


def _layout(result: Plan) -> str:
    p = result.cfg.parallel
    return (f"TP {p.tp}{' (SP)' if p.sequence_parallel else ''} x PP {p.pp} x DP {result.dp}, "
            f"mbs {result.cfg.data.micro_batch_size}, recompute {p.recompute_granularity or 'none'}, peak {_gib(result.peak)} GiB")


PRESET_CONFIGS = ("configs/stage1-vicuna-7b.yaml", "configs/stage1-mistral-7b.yaml",
                  "configs/stage2-vicuna-7b.yaml", "configs/stage2-mistral-7b.yaml")
TABLE_CARDS = ((8, 40), (8, 80), (32, 80))


def readme_table(root: str = ".") -> str:
    """The README's table: every 7B preset on 8 x 40 GB, 8 x 80 GB and 32 x 80 GB."""
    from pipeline.config import load_config

    rows = ["| preset | GPUs | verdict | layout (planner's peak per GPU) |",
            "|---|---|---|---|"]
    for path in PRESET_CONFIGS:
        cfg = load_config(f"{root}/{path}")
        for gpus, gib in TABLE_CARDS:
            verdict, layout = recommend(cfg, gpus, gib * GIB)
            rows.append(f"| `{path.split('/')[-1]}` | {gpus} x {gib} GB | {verdict} | {layout} |")
    return "\n".join(rows)


def main(cfg: TrainConfig, gpus: int, gpu_memory: str,
         peak_tflops: Optional[float] = None) -> int:
    """``--plan``: print the plan; 0 when the layout fits, 3 when it does not (2, a config
    error, is the caller's). A layout the trainer would refuse is planned with the changes
    that make it valid and fit."""
    memory = parse_bytes(gpu_memory)
    work = workload(cfg)
    if layout_error(cfg, gpus) is not None:
        fixes = suggestions(cfg, gpus, memory, work=work)
        print(f"layout: {layout_error(cfg, gpus)}")
        if not fixes:
            print("no change of TP, PP, SP, recompute or micro-batch gives a valid layout "
                  "that fits")
            return 3
        print("nearest layouts that are valid and fit:")
        for sets, fixed in fixes:
            print(f"  {' '.join('--set ' + s for s in sets)}  (peak {_gib(fixed.peak)} GiB)")
        return 3
    result = plan(cfg, gpus, memory, work=work, peak_tflops=peak_tflops)
    fixes = () if result.fits else suggestions(cfg, gpus, memory, work=work)
    print(report(result, fixes), flush=True)
    return 0 if result.fits else 3
