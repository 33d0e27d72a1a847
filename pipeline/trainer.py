"""The training loop: a ``Trainer`` that builds the run's components and only trains.

Per optimizer step (``train_step``):
  1. this rank's micro-batches (global batch / (micro-batch x DP) of them, ``pipeline/steps.py``),
  2. megatron's forward/backward schedule (no pipelining, 1F1B or interleaved 1F1B), whose
     ``finalize_model_grads`` does the DP reduce-scatter and the stage-replica all-reduce,
  3. DistributedOptimizer step (clipping inside), LR scheduler step,
  4. the step loss (``megatron_vwlmm/model/forward_step.py``) and metrics.
Around it (``train``): periodic validation (``pipeline/evaluation.py``), periodic / final /
preemption checkpoints (``pipeline/checkpoint.py``), and the named events tests hook into
(``vwlmm_data/hooks.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

from megatron_vwlmm.model.forward_step import TokenTotals, reduce_step_losses
from pipeline.config import TrainConfig
from vwlmm_data import hooks


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[vwlmm-train] {msg}", flush=True)


class Trainer:
    """Every rank builds one; ``train()`` runs the loop and returns a summary."""

    def __init__(self, cfg: TrainConfig, manifest, shards, s3, dp_size: int, preempt) -> None:
        from megatron.core import parallel_state as ps

        from pipeline.checkpoint import CheckpointManager, TrainState
        from pipeline.data.loader import build_rank_data
        from pipeline.evaluation import Validator
        from pipeline.metrics import MetricsLogger, SampleKeyLog
        from pipeline.model_setup import build_model_chunks, wire_schedule_config
        from pipeline.optim import build_optimizer, build_scheduler
        from pipeline.steps import Schedule, StepData, schedule_shape

        self.cfg, self.shards, self.dp_size, self.preempt = cfg, shards, dp_size, preempt
        self.model_cfg = cfg.model.vwlmm()
        self.run_dir = Path(cfg.run_dir)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        if cfg.train.deterministic and torch.cuda.is_available():
            torch.backends.cudnn.deterministic = True

        # --- model, optimizer, schedule --------------------------------------------------------
        self.chunks = build_model_chunks(cfg)
        self.optimizer = build_optimizer(cfg, self.chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        wire_schedule_config(self.chunks, self.optimizer, cfg)
        n_params = sum(p.numel() for c in self.chunks for p in c.parameters())
        n_train = sum(p.numel() for c in self.chunks for p in c.parameters() if p.requires_grad)
        log(f"layout TP={cfg.parallel.tp} PP={cfg.parallel.pp} VPP={cfg.parallel.vpp or 1} "
            f"DP={dp_size}; rank 0 holds {n_params / 1e6:.2f}M parameters "
            f"({n_train / 1e6:.2f}M trainable)")

        # --- where training stands -------------------------------------------------------------
        self.checkpointer = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last,
                                              cfg.to_dict(), manifest.tokenizer.to_dict())
        self.state = TrainState()
        self._restore()

        # --- data, validation, metrics ---------------------------------------------------------
        mbs, gbs = cfg.data.micro_batch_size, cfg.data.global_batch_size
        self.num_microbatches = gbs // (mbs * dp_size)  # unpacked; packed steps carry their own
        spec, self.data = build_rank_data(cfg, self.model_cfg, shards, s3, dp_size)
        self.needs_data = self.data is not None
        self.train_data = StepData(
            self.data.train_iterator(self.state.consumed_samples) if self.data else None,
            self.needs_data, self.device, cfg.data.packing)
        self.schedule = Schedule(self.chunks, schedule_shape(
            cfg.data.packing, mbs, self.model_cfg.decoder.seq_length))
        self.validator = Validator(cfg.train.eval_interval, cfg.train.eval_iters,
                                   cfg.data.valid_fraction > 0, self.model_cfg.lambda_vm)
        self.metrics = MetricsLogger(self.run_dir, rank == world - 1, cfg.logging, world,
                                     cfg.train.train_iters, cfg.to_dict())
        if self.resumed_from is not None:
            self.metrics.mark_resume(self.state.iteration, str(self.resumed_from))
        self.sample_log = SampleKeyLog(
            self.run_dir, spec.dp_rank,
            cfg.logging.record_sample_keys and self.needs_data
            and ps.is_pipeline_first_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def _restore(self) -> None:
        """Resume from the run's latest checkpoint, or take ``model.init_from``'s weights."""
        from megatron_vwlmm.checkpoint.safe_read import CheckpointError
        from megatron_vwlmm.checkpoint.layout import previous_checkpoint_hint

        cfg = self.cfg
        resume_from = self.checkpointer.resume_point(cfg.checkpoint.auto_resume,
                                                     cfg.checkpoint.resume_iteration)
        self.resumed_from = resume_from
        if resume_from is not None:
            try:
                self.state = self.checkpointer.load(resume_from, self.chunks, self.optimizer,
                                                    self.scheduler)
            except CheckpointError as exc:  # a fingerprint mismatch included
                raise CheckpointError(f"{exc}; {previous_checkpoint_hint(resume_from)}") \
                    from None
            log(f"resumed from {resume_from} at iteration {self.state.iteration}, "
                f"{self.state.consumed_samples} samples consumed")
            saved_dp = (self.state.saved_layout or {}).get("dp", self.dp_size)
            if saved_dp != self.dp_size and self.shards[0].format == "webdataset":
                log(f"warning: checkpoint was written at DP={saved_dp}, now DP={self.dp_size}; "
                    "WebDataset streams are per rank, so the resumed order is not the one an "
                    "uninterrupted run would have read (use Arrow shards for exact DP changes)")
        elif cfg.model.init_from:
            self.checkpointer.load(Path(cfg.model.init_from), self.chunks)
            self.optimizer.reload_model_params()
            log(f"initial weights from {cfg.model.init_from}")

    # ------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        cfg, state = self.cfg, self.state
        log(f"training iterations {state.iteration + 1}..{cfg.train.train_iters}, "
            + (f"{cfg.data.global_batch_size // self.dp_size} samples per rank per step packed "
               f"into micro-batches of {cfg.data.micro_batch_size} row(s) of "
               f"{self.model_cfg.decoder.seq_length}" if cfg.data.packing else
               f"{self.num_microbatches} micro-batches of {cfg.data.micro_batch_size} per rank "
               "per step")
            + f", loss normalisation {cfg.optim.loss_normalization}")
        last: Dict[str, Any] = {}
        stop_reason = "finished"
        while state.iteration < cfg.train.train_iters:
            last = self.train_step()
            if self.validator.should_validate(state.iteration):
                self.validate()
            preempted = self.preempt.any_rank_received() if cfg.checkpoint.save_on_signal \
                else False
            if preempted or self._checkpoint_due():
                path = self.checkpointer.save(state, self.chunks, self.optimizer, self.scheduler)
                log(f"saved checkpoint {path}")
            hooks.fire("train.after_step", iteration=state.iteration)
            if preempted:
                stop_reason = "preempted"
                log(f"signal received: checkpointed iteration {state.iteration} and stopping")
                break
        self.sample_log.close()
        self.metrics.close()
        log(f"{stop_reason}: iteration {state.iteration}, run folder {self.run_dir.resolve()}, "
            f"checkpoints {cfg.checkpoint_dir.resolve()}")
        if self.metrics.enabled:
            print(f"[vwlmm-train] summary: {self.metrics.summary()}", flush=True)
        return {"state": state, "last": last, "stop_reason": stop_reason}

    def _checkpoint_due(self) -> bool:
        it, c = self.state.iteration, self.cfg.checkpoint
        return it == self.cfg.train.train_iters or bool(c.save_interval and
                                                        it % c.save_interval == 0)

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step; returns its metrics record."""
        from megatron.core import parallel_state as ps

        from pipeline.flops import step_flops
        from pipeline.metrics import peak_memory_gib

        cfg, state = self.cfg, self.state
        self.metrics.start_step()
        step = self.train_data.next_step(self.num_microbatches)
        counts = self.train_data.global_counts(step)
        per_token = cfg.optim.loss_normalization == "per_token"
        totals = TokenTotals(counts["lm_tokens"], counts["vm_positions"]) \
            if per_token and self.needs_data else None

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.schedule.run(step, forward_only=False, token_totals=totals)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"iteration {state.iteration + 1}: optimizer step skipped "
                                     "(inf/nan gradients)")
        self.scheduler.step(increment=1)
        state.iteration += 1
        state.consumed_samples += cfg.data.global_batch_size
        self.sample_log.record(state.iteration, step.keys)

        reduced = reduce_step_losses(
            losses, self.model_cfg.lambda_vm, per_token,
            dp_group=ps.get_data_parallel_group(with_context_parallel=True)) \
            if ps.is_pipeline_last_stage(ignore_virtual=True) else {}
        flops = step_flops(self.model_cfg, counts["useful_positions"],
                           counts["attention_square"], counts["images"])
        lr = next(g["lr"] for g in self.optimizer.param_groups)
        padding = 1 - counts["useful_positions"] / max(counts["computed_positions"], 1)
        return self.metrics.log_step(
            state.iteration, reduced, grad_norm, lr, cfg.data.global_batch_size,
            counts["useful_positions"], flops, peak_memory_gib(),
            extra={"supervised_tokens": counts["lm_tokens"], "padding_fraction": padding,
                   "micro_batches": step.num_microbatches,
                   "consumed_samples": state.consumed_samples})

    def validate(self) -> None:
        from pipeline.steps import StepData

        data = StepData(self.data.valid_iterator() if self.data else None, self.needs_data,
                        self.device, self.cfg.data.packing)
        losses = self.validator.validate(self.chunks, self.schedule, data,
                                         self.num_microbatches)
        self.metrics.log_eval(self.state.iteration, losses)
