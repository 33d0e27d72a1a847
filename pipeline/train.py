"""VW-LMM pretraining entry point (torchrun / srun): ``python -m pipeline.train --config X.yaml``.

One process per device. The loop per optimizer step:
  1. fetch this rank's micro-batches (global batch / (micro-batch x DP) of them),
  2. megatron's forward/backward schedule (no pipelining, 1F1B or interleaved 1F1B),
  3. ``finalize_model_grads`` (DP reduce-scatter + first/last-stage replica all-reduce),
  4. DistributedOptimizer step (clipping inside), LR scheduler step,
  5. metrics, periodic validation, periodic / preemption checkpoints.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from megatron_vwlmm.model.forward_step import TokenTotals
from pipeline.config import (ConfigError, TrainConfig, build_model_config, describe_fields,
                             load_config, with_model_fields)

# megatron's distributed optimizer zeroes gradients by probing ``.grad`` on every tensor of its
# groups, views of the fp32 main shards included (its ``_zero_grad_group_helper``): torch warns
# on each step about a harmless read.
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf",
                        category=UserWarning)
from pipeline.validate import (check_fp8_available, check_init_from, check_layout, check_manifest,
                               check_model, load_manifest, select_shards)


def transformer_overrides(cfg: TrainConfig) -> Dict[str, Any]:
    p = cfg.parallel
    out: Dict[str, Any] = {"sequence_parallel": p.sequence_parallel}
    if p.vpp:
        out["virtual_pipeline_model_parallel_size"] = p.vpp
    if p.recompute_granularity:
        out["recompute_granularity"] = p.recompute_granularity
        if p.recompute_granularity == "full":
            out["recompute_method"] = p.recompute_method
            out["recompute_num_layers"] = p.recompute_num_layers or 1
    if cfg.precision.fp8:
        out["fp8_recipe"] = cfg.precision.fp8_recipe
    if cfg.optim.loss_normalization == "per_token":
        # megatron then leaves the loss unaveraged (schedules) and the gradients unscaled by DP
        # (DDP): the per-token loss is normalised by the global batch's totals instead.
        out["calculate_per_token_loss"] = True
    return out


# ------------------------------------------------------------------------------------------
# model / optimizer construction
# ------------------------------------------------------------------------------------------


def build_model_chunks(cfg: TrainConfig, model_cfg) -> List[torch.nn.Module]:
    """One VWLMMModel per virtual stage, on the device, wrapped in megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_vwlmm.model import build_model

    chunks = []
    for vp in range(cfg.parallel.vpp or 1):
        vp_stage = vp if cfg.parallel.vpp else None
        model = build_model(
            model_cfg,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            transformer_overrides=transformer_overrides(cfg),
        )
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
    """Hooks megatron's schedules read from the model config (as Megatron-LM's training.py)."""
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


# ------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------


def forward_step_func(data_iterator, model, token_totals=None):
    """megatron's forward_step_func: the batch is already on the device (None, or only the
    packing layout, off the first and last stages)."""
    from megatron_vwlmm.model.forward_step import forward_step

    return forward_step(next(data_iterator) if data_iterator is not None else None, model,
                        token_totals)


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

    def iterators(self, num_chunks: int) -> list:
        return [iter(self.batches) for _ in range(num_chunks)]


_COUNT_KEYS = ("samples", "images", "lm_tokens", "vm_positions", "useful_positions",
               "computed_positions", "attention_square")


def _batch_counts(batches) -> Dict[str, int]:
    counts = dict.fromkeys(_COUNT_KEYS, 0)
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
    """Pulls a step's micro-batches off the loader and fans them out to the model chunks.

    Unpacked, a step is ``num_microbatches`` loader items; packed, one loader item holds the
    whole step (its micro-batch count depends on the data). Stages that read no data (the
    middle of a pipeline) learn a packed step's layout from the first stage.
    """

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
        counts = _batch_counts(batches) if self.needs_data else dict.fromkeys(_COUNT_KEYS, 0)
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

        t = torch.tensor([float(step.counts[k]) for k in _COUNT_KEYS], dtype=torch.float64)
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
        return {k: int(v) for k, v in zip(_COUNT_KEYS, t.tolist())}


def _share_packing_with_middle_stages(batches: list, needs_data: bool, device) -> list:
    """Middle pipeline stages get each packed micro-batch's PackedSequence from the first stage
    (their attention needs the document boundaries; they read no data)."""
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


def build_rank_data(cfg: TrainConfig, model_cfg, shards, s3, dp_size: int):
    """(LoaderSpec, RankData or None): only the first and last pipeline stages read data."""
    from megatron.core import parallel_state as ps

    from pipeline.data.loader import LoaderSpec, RankData
    from vwlmm_data.contract import VisionInfo

    spec = LoaderSpec(
        shards=tuple(shards), format=shards[0].format, packing=cfg.data.packing,
        group_by_modality_length=cfg.data.group_by_modality_length,
        micro_batch_size=cfg.data.micro_batch_size, global_batch_size=cfg.data.global_batch_size,
        dp_size=dp_size, dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        seed=cfg.data.seed, seq_length=model_cfg.decoder.seq_length,
        num_patches=model_cfg.num_patches, image_size=model_cfg.vision.image_size,
        pad_token_id=cfg.data.pad_token_id, vision=VisionInfo.of(model_cfg.vision.kind),
        valid_fraction=cfg.data.valid_fraction,
        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor, s3=s3)
    needs_data = ps.is_pipeline_first_stage(ignore_virtual=True) or \
        ps.is_pipeline_last_stage(ignore_virtual=True)
    return spec, (RankData(spec) if needs_data else None)


def schedule_shape(cfg: TrainConfig, seq_length: int) -> tuple[int, int]:
    """(seq_length, micro_batch_size) of the activations pipeline stages exchange: a packed
    micro-batch is one sequence of all its rows."""
    mbs = cfg.data.micro_batch_size
    return (mbs * seq_length, 1) if cfg.data.packing else (seq_length, mbs)


def train_step(chunks, optimizer, scheduler, fwd_bwd, step: Step, shape: tuple[int, int],
               iteration: int, token_totals=None):
    """One optimizer step over the step's micro-batches; returns (per-micro-batch losses, grad
    norm).

    Gradients accumulate in megatron's grad buffers across the micro-batches; the schedule
    calls ``finalize_model_grads`` (DP reduce + stage-replica all-reduce) before the step.
    """
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    iters = step.iterators(len(chunks))
    losses = fwd_bwd(forward_step_func=functools.partial(forward_step_func,
                                                         token_totals=token_totals),
                     data_iterator=iters if len(chunks) > 1 else iters[0],
                     model=chunks if len(chunks) > 1 else chunks[0],
                     num_microbatches=step.num_microbatches, seq_length=shape[0],
                     micro_batch_size=shape[1], forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError(f"iteration {iteration}: optimizer step skipped "
                                 "(inf/nan gradients)")
    scheduler.step(increment=1)
    return losses, grad_norm


def reduce_losses(losses_reduced: List[Dict[str, torch.Tensor]], lambda_vm: float,
                  token_weighted: bool) -> Dict[str, float]:
    """The step's losses over its micro-batches and DP ranks (only meaningful on the last
    stage): token-weighted (sums over counts: per-token training and every validation), or the
    mean of micro-batch means (per-micro-batch training, what that mode optimises)."""
    from megatron.core import parallel_state as ps

    if not losses_reduced:
        return {}
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    dp = dist.get_world_size(dp_group)
    if token_weighted:
        keys = ("lm_sum", "lm_count", "vm_sum", "vm_count")
        values = torch.stack([torch.stack([d[k].float() for d in losses_reduced]).sum(0)
                              for k in keys]).double()
        if dp > 1:
            dist.all_reduce(values, group=dp_group)
        lm_sum, lm_count, vm_sum, vm_count = values.cpu().tolist()
        lm, vm = lm_sum / max(lm_count, 1), vm_sum / max(vm_count, 1)
        return {"lm_loss": lm, "vm_loss": vm, "total_loss": lm + lambda_vm * vm}
    keys = ("lm_loss", "total_loss", "vm_loss")
    values = torch.stack([torch.stack([d[k].float() for d in losses_reduced]).mean(0)
                          for k in keys])
    if dp > 1:
        dist.all_reduce(values, group=dp_group)
        values /= dp
    return {k: float(v) for k, v in zip(keys, values.cpu())}


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[vwlmm-train] {msg}", flush=True)


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train as configured; returns a summary (last metrics, final checkpoint) on every rank."""
    from megatron_vwlmm.parallel.initialize import destroy_distributed, initialize_distributed
    from pipeline.signals import PreemptionFlag
    from vwlmm_data.storage import S3Options

    # --- everything checkable before touching a process group -----------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp_size = check_layout(cfg, world_size)
    check_fp8_available(cfg)
    model_cfg = build_model_config(cfg)
    check_model(model_cfg, cfg)
    check_init_from(model_cfg, cfg)
    s3 = S3Options(cfg.data.s3_endpoint_url, cfg.data.s3_region)
    if not cfg.data.path:
        raise ConfigError("data.path: required (the preprocessing output folder or s3:// URL)")
    manifest = load_manifest(cfg.data.path, s3)
    check_manifest(manifest, model_cfg, cfg)
    shards = select_shards(manifest, cfg.data.path, cfg.data.format)

    initialize_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp,
                           seed=cfg.train.seed, backend=cfg.parallel.backend,
                           timeout_s=cfg.parallel.timeout_s)
    preempt = PreemptionFlag(cfg.checkpoint.save_on_signal)
    try:
        return _train(cfg, model_cfg, shards, s3, dp_size, preempt)
    finally:
        preempt.restore()
        destroy_distributed()


def _train(cfg, model_cfg, shards, s3, dp_size, preempt) -> Dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pipeline.checkpoint import CheckpointManager, TrainState
    from pipeline.flops import step_flops
    from pipeline.metrics import MetricsLogger, peak_memory_gib
    from pipeline.optim import build_optimizer, build_scheduler

    run_dir = Path(cfg.run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if cfg.train.deterministic and torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True

    chunks = build_model_chunks(cfg, model_cfg)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    wire_schedule_config(chunks, optimizer, cfg)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    n_train = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    _log(f"layout TP={cfg.parallel.tp} PP={cfg.parallel.pp} VPP={cfg.parallel.vpp or 1} "
         f"DP={dp_size}; rank 0 holds {n_params / 1e6:.2f}M parameters "
         f"({n_train / 1e6:.2f}M trainable)")

    ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last, cfg.to_dict(),
                             cfg.fault.kill_during_save)
    state = TrainState()
    resume_from = ckpt.resume_point(cfg.checkpoint.auto_resume)
    if resume_from is not None:
        state = ckpt.load(resume_from, chunks, optimizer, scheduler)
        _log(f"resumed from {resume_from} at iteration {state.iteration}, "
             f"{state.consumed_samples} samples consumed")
        saved_dp = (state.saved_layout or {}).get("dp", dp_size)
        if saved_dp != dp_size and shards[0].format == "webdataset":
            _log(f"warning: checkpoint was written at DP={saved_dp}, now DP={dp_size}; "
                 "WebDataset streams are per rank, so the resumed order is not the one an "
                 "uninterrupted run would have read (use Arrow shards for exact DP changes)")
    elif cfg.model.init_from:
        ckpt.load(Path(cfg.model.init_from), chunks)
        optimizer.reload_model_params()
        _log(f"initial weights from {cfg.model.init_from}")

    # --- data --------------------------------------------------------------------------------
    mbs, gbs = cfg.data.micro_batch_size, cfg.data.global_batch_size
    num_microbatches = gbs // (mbs * dp_size)  # unpacked; packed steps carry their own count
    spec, data = build_rank_data(cfg, model_cfg, shards, s3, dp_size)
    needs_data = data is not None
    train_data = StepData(data.train_iterator(state.consumed_samples) if data else None,
                          needs_data, device, cfg.data.packing)

    fwd_bwd = get_forward_backward_func()
    shape = schedule_shape(cfg, model_cfg.decoder.seq_length)
    per_token = cfg.optim.loss_normalization == "per_token"
    lambda_vm = model_cfg.lambda_vm
    is_logger = rank == world - 1  # last PP stage, last TP/DP rank
    metrics = MetricsLogger(run_dir, is_logger, cfg.logging.tensorboard,
                            cfg.logging.log_interval, world, cfg.logging.peak_tflops_per_device)
    keys_file = None
    if cfg.logging.record_sample_keys and needs_data and ps.is_pipeline_first_stage(
            ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        keys_file = open(run_dir / "samples" / f"dp{spec.dp_rank}.jsonl", "a")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    last: Dict[str, Any] = {}
    stop_reason = "finished"
    _log(f"training iterations {state.iteration + 1}..{cfg.train.train_iters}, "
         + (f"{gbs // dp_size} samples per rank per step packed into micro-batches of {mbs} "
            f"row(s) of {model_cfg.decoder.seq_length}" if cfg.data.packing else
            f"{num_microbatches} micro-batches of {mbs} per rank per step")
         + f", loss normalisation {cfg.optim.loss_normalization}")
    while state.iteration < cfg.train.train_iters:
        metrics.start_step()
        step = train_data.next_step(num_microbatches)
        counts = train_data.global_counts(step)
        totals = TokenTotals(counts["lm_tokens"], counts["vm_positions"]) \
            if per_token and needs_data else None
        losses, grad_norm = train_step(chunks, optimizer, scheduler, fwd_bwd, step, shape,
                                       state.iteration + 1, totals)
        state.iteration += 1
        state.consumed_samples += gbs
        if keys_file is not None:
            keys_file.write(json.dumps({"iteration": state.iteration, "keys": step.keys}) + "\n")
            keys_file.flush()

        is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        reduced = reduce_losses(losses, lambda_vm, per_token) if is_last else {}
        flops = step_flops(model_cfg, counts["useful_positions"], counts["attention_square"],
                           counts["images"])
        lr = next(g["lr"] for g in optimizer.param_groups)
        padding = 1 - counts["useful_positions"] / max(counts["computed_positions"], 1)
        last = metrics.log_step(state.iteration, reduced, grad_norm, lr, gbs,
                                counts["useful_positions"], flops, peak_memory_gib(),
                                extra={"supervised_tokens": counts["lm_tokens"],
                                       "padding_fraction": padding,
                                       "micro_batches": step.num_microbatches,
                                       "consumed_samples": state.consumed_samples})

        if cfg.train.eval_interval and state.iteration % cfg.train.eval_interval == 0 and \
                cfg.data.valid_fraction > 0:
            valid = evaluate(cfg, chunks, data, needs_data, device, num_microbatches, fwd_bwd,
                             shape, lambda_vm)
            metrics.log_eval(state.iteration, valid)

        preempted = preempt.any_rank_received() if cfg.checkpoint.save_on_signal else False
        periodic = cfg.checkpoint.save_interval and \
            state.iteration % cfg.checkpoint.save_interval == 0
        final = state.iteration == cfg.train.train_iters
        if preempted or periodic or final:
            path = ckpt.save(state, chunks, optimizer, scheduler)
            _log(f"saved checkpoint {path}")
        if cfg.fault.kill_after_step == state.iteration:
            os.kill(os.getpid(), signal.SIGKILL)  # failure injection for resume tests
        if preempted:
            stop_reason = "preempted"
            _log(f"signal received: checkpointed iteration {state.iteration} and stopping")
            break

    if keys_file is not None:
        keys_file.close()
    metrics.close()
    _log(f"{stop_reason}: iteration {state.iteration}, run folder {run_dir.resolve()}, "
         f"checkpoints {cfg.checkpoint_dir.resolve()}")
    return {"state": state, "last": last, "stop_reason": stop_reason}


def evaluate(cfg, chunks, data, needs_data, device, num_microbatches, fwd_bwd, shape,
             lambda_vm):
    """Forward-only pass over ``eval_iters`` global batches of the validation split; losses
    are token-weighted over all of it (independent of packing and normalisation)."""
    from megatron.core import parallel_state as ps

    loader = StepData(data.valid_iterator() if data else None, needs_data, device,
                      cfg.data.packing)
    for c in chunks:
        c.eval()
    collected: List[Dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for _ in range(cfg.train.eval_iters):
            step = loader.next_step(num_microbatches)
            iters = step.iterators(len(chunks))
            out = fwd_bwd(forward_step_func=forward_step_func,
                          data_iterator=iters if len(chunks) > 1 else iters[0],
                          model=chunks if len(chunks) > 1 else chunks[0],
                          num_microbatches=step.num_microbatches, seq_length=shape[0],
                          micro_batch_size=shape[1], forward_only=True)
            collected.extend(out or [])
    for c in chunks:
        c.train()
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    return reduce_losses(collected, lambda_vm, token_weighted=True)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

_EPILOG = """\
launch:
  torchrun --nproc_per_node 8 --nnodes N --rdzv-endpoint HOST:PORT -m pipeline.train \\
      --config configs/stage1-vicuna-7b.yaml --set data.path=/data/llava_558k --set run_dir=runs/s1
  (also installed as `vwlmm-train`; under Slurm run the same module from `srun`, exporting
  RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM_* variables.)

presets: configs/tiny-cpu.yaml, stage1-vicuna-7b, stage1-mistral-7b, stage2-vicuna-7b,
  stage2-mistral-7b. A run resumes automatically from <run_dir>/checkpoints/latest.
  SIGTERM/SIGUSR1 -> checkpoint and clean exit. Metrics: <run_dir>/metrics.jsonl and
  <run_dir>/tensorboard; `python -m pipeline.plot <run_dir>` draws the loss curves.

every --set key (type = default; model.* fields default to model.preset's values):
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Pretrain VW-LMM on megatron-core (TP x PP x DP) from tokenized shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG + describe_fields())
    parser.add_argument("--config", help="YAML preset (see configs/); omit to use defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set optim.lr=2e-5 or "
                             "--set model.decoder.num_layers=8 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (every model field spelled "
                             "out) and exit")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(with_model_fields(cfg).to_dict(), sort_keys=False))
            return
        run(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
