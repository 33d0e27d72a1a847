"""Per-step metrics: one stdout line, one JSONL record and TensorBoard scalars (last rank logs).

The last pipeline stage owns the losses, so global rank ``world-1`` (last stage, last TP/DP
rank) writes; every rank reports its own peak memory into the all-reduced max beforehand.

Each stdout line starts with the progress users know from Megatron-LM and HF Trainer:
``iter 6/30 (20%) | 0.42 s/it | elapsed 0:00:03 | ETA 0:00:10 | ...`` (on a terminal with
tqdm's bar in front). ``metrics.jsonl`` is strict JSON (a value that is not a finite number is
``null``); a resumed run first writes ``{"split": "resume", "iteration": N, ...}``, after which
its records replace those of the same iterations (readers keep the last record of each
iteration, as ``pipeline/plot.py`` does).

Benchmarks (``vwlmm-eval``, ``pipeline/evaluate.py``) add one ``{"split": "eval", "iteration":
N, "task": T, <metric>: value, ...}`` record per task and checkpoint to the same file, and the
TensorBoard scalars ``eval/<task>/<metric>`` beside the training curves.
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Deque, Dict, List, Optional

import torch

from pipeline.config import LoggingSection

METRICS_FILE = "metrics.jsonl"
EVAL_SPLIT = "eval"


def read_metrics(run_dir: Path) -> List[Dict]:
    """Every record of ``<run_dir>/metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} a training run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricsLogger:
    """Writes records to stdout / ``<run_dir>/metrics.jsonl`` / ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: Path, enabled: bool, options: LoggingSection, world_size: int,
                 train_iters: int = 0, run_config: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.train_iters = train_iters
        self._run_t0 = time.perf_counter()
        self._step_times: Deque[float] = collections.deque(maxlen=20)
        self.totals = {"samples": 0, "tokens": 0, "iterations": 0}
        self.log_interval = options.log_interval
        self.world_size = world_size
        self.peak = options.peak_tflops_per_device
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / METRICS_FILE, "a")
            if options.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            if options.wandb_project:
                import wandb

                # Offline runs write <run_dir>/wandb/offline-run-*; `wandb sync` uploads them.
                self.wandb = wandb.init(project=options.wandb_project, dir=str(run_dir),
                                        name=Path(run_dir).resolve().name, mode=options.wandb_mode,
                                        config=run_config or {})
        self._t0: Optional[float] = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def log_step(self, iteration: int, losses: Dict[str, float], grad_norm: Optional[float],
                 lr: float, samples: int, tokens: int, flops: float, memory_gib: float,
                 extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Record one optimizer step; returns the record (also on non-logging ranks)."""
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self._step_times.append(dt)
        self.totals["samples"] += samples
        self.totals["tokens"] += tokens
        self.totals["iterations"] += 1
        tflops = flops / max(dt, 1e-9) / 1e12
        record = {
            "iteration": iteration, **losses,
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "lr": lr, "step_time_s": dt,
            "samples_per_s": samples / max(dt, 1e-9), "tokens_per_s": tokens / max(dt, 1e-9),
            "tflops": tflops, "tflops_per_device": tflops / self.world_size,
            "mfu": (tflops / self.world_size / self.peak) if self.peak > 0 else float("nan"),
            "memory_gib": memory_gib, **(extra or {}), **self._progress(iteration),
        }
        if self.enabled:
            self._write(record, "train", iteration % self.log_interval == 0)
        return record

    def _progress(self, iteration: int) -> Dict[str, float]:
        """Seconds per iteration (median of the last 20 steps: robust to the first step's
        warm-up and to evaluation/checkpoint pauses), elapsed time and ETA of this launch."""
        recent = sorted(self._step_times)
        per_it = recent[(len(recent) - 1) // 2]
        return {"train_iters": self.train_iters, "s_per_it": per_it,
                "elapsed_s": time.perf_counter() - self._run_t0,
                "eta_s": per_it * max(self.train_iters - iteration, 0)}

    def mark_resume(self, iteration: int, checkpoint: str) -> None:
        """Tell readers of metrics.jsonl that records from here on continue from ``iteration``
        (those of later iterations already in the file are superseded)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"split": "resume", "iteration": iteration,
                                         "checkpoint": checkpoint}) + "\n")
            self.jsonl.flush()

    def summary(self) -> str:
        """One line: what this launch did."""
        elapsed = time.perf_counter() - self._run_t0
        t = self.totals
        return (f"{t['iterations']} iterations in {_clock(elapsed)}: {t['samples']} samples, "
                f"{t['tokens']} tokens (useful), {t['samples'] / max(elapsed, 1e-9):.2f} "
                f"samples/s, {t['tokens'] / max(elapsed, 1e-9):.0f} tokens/s")

    def log_eval(self, iteration: int, losses: Dict[str, float]) -> None:
        if self.enabled:
            self._write({"iteration": iteration, **{f"valid_{k}": v for k, v in losses.items()}},
                        "valid", True)

    def log_benchmark(self, iteration: int, task: str, metrics: Dict[str, float],
                      details: Dict[str, str]) -> None:
        """One benchmark task's scores on the checkpoint of ``iteration``; ``details`` (the
        checkpoint, the evaluation's id) go to metrics.jsonl only."""
        if self.enabled:
            self._write({"iteration": iteration, "task": task, **details, **metrics},
                        EVAL_SPLIT, True, scalars=metrics, tag_prefix=f"{EVAL_SPLIT}/{task}")

    def _write(self, record: Dict[str, float], group: str, to_stdout: bool,
               scalars: Optional[Dict[str, float]] = None,
               tag_prefix: Optional[str] = None) -> None:
        """``scalars`` (default: the record's numbers but the iteration) go to TensorBoard and
        W&B as ``<tag_prefix>/<name>`` (default prefix: ``group``)."""
        strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        prefix = tag_prefix or group
        numbers = {k: v for k, v in (record if scalars is None else scalars).items()
                   if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v)}
        # TensorBoard before the record: a crash in between repeats a scalar on the next
        # attempt, never loses one whose record a reader already sees.
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, record["iteration"])
            self.writer.flush()
        self.jsonl.write(json.dumps({"split": group, **strict}, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:  # the same scalars as TensorBoard, under the same names
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()},
                           step=record["iteration"])
        if to_stdout:
            print(_format(group, record), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _format(group: str, r: Dict[str, float]) -> str:
    def f(key: str, fmt: str) -> str:
        v = r.get(key)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    if group == EVAL_SPLIT:
        body = " | ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "iteration"
                          and isinstance(v, (int, float)) and not isinstance(v, bool))
        return f"[eval] iter {r['iteration']} | {r['task']} | {body}"
    if group == "valid":
        body = " | ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("valid_"))
        return f"[valid] iter {r['iteration']} | {body}"
    total, it = r.get("train_iters") or 0, r["iteration"]
    head = f"{it}/{total} ({100 * it / total:.0f}%)" if total else f"{it}"
    parts = [f"iter {head}", f"{r['s_per_it']:.2f} s/it", f"elapsed {_clock(r['elapsed_s'])}",
             f"ETA {_clock(r['eta_s'])}", f"lm_loss {f('lm_loss', '.4f')}",
             f"vm_loss {f('vm_loss', '.4f')}", f"total {f('total_loss', '.4f')}",
             f"grad_norm {f('grad_norm', '.3f')}", f"lr {f('lr', '.3e')}",
             f"tokens/s {f('tokens_per_s', '.0f')}", f"samples/s {f('samples_per_s', '.2f')}",
             f"TFLOP/s/dev {f('tflops_per_device', '.3f')}"]
    if not math.isnan(r.get("mfu", float("nan"))):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {f('memory_gib', '.2f')} GiB")
    line = "[train] " + " | ".join(parts)
    if total and sys.stdout.isatty():  # a terminal gets tqdm's bar in front
        from tqdm import tqdm

        line = tqdm.format_meter(it, total, r["elapsed_s"], ncols=40, bar_format="{bar}") + \
            " " + line
    return line


def _clock(seconds: float) -> str:
    """H:MM:SS, as Megatron-LM and tqdm print durations."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class SampleKeyLog:
    """``<run_dir>/samples/dp<R>.jsonl``: the keys of the samples each DP rank trained on, per
    iteration (audits, and the tests of data order). Written by the first pipeline stage's
    TP rank 0 of each DP rank; a no-op elsewhere or when not asked for."""

    def __init__(self, run_dir: Path, dp_rank: int, enabled: bool) -> None:
        self.file = None
        if enabled:
            (Path(run_dir) / "samples").mkdir(parents=True, exist_ok=True)
            self.file = open(Path(run_dir) / "samples" / f"dp{dp_rank}.jsonl", "a")

    def record(self, iteration: int, keys: list) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"iteration": iteration, "keys": keys}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
