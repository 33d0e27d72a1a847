"""Per-step metrics: one stdout line, one JSONL record and TensorBoard scalars (last rank logs).

The last pipeline stage owns the losses, so global rank ``world-1`` (last stage, last TP/DP
rank) writes; every rank reports its own peak memory into the all-reduced max beforehand.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

METRICS_FILE = "metrics.jsonl"


def peak_memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricsLogger:
    """Writes records to stdout / ``<run_dir>/metrics.jsonl`` / ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log_interval: int,
                 world_size: int, peak_tflops_per_device: float) -> None:
        self.enabled = enabled
        self.log_interval = log_interval
        self.world_size = world_size
        self.peak = peak_tflops_per_device
        self.writer = None
        self.jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / METRICS_FILE, "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self._t0: Optional[float] = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def log_step(self, iteration: int, losses: Dict[str, float], grad_norm: Optional[float],
                 lr: float, samples: int, tokens: int, flops: float, memory_gib: float,
                 extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Record one optimizer step; returns the record (also on non-logging ranks)."""
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        tflops = flops / max(dt, 1e-9) / 1e12
        record = {
            "iteration": iteration, **losses,
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "lr": lr, "step_time_s": dt,
            "samples_per_s": samples / max(dt, 1e-9), "tokens_per_s": tokens / max(dt, 1e-9),
            "tflops": tflops, "tflops_per_device": tflops / self.world_size,
            "mfu": (tflops / self.world_size / self.peak) if self.peak > 0 else float("nan"),
            "memory_gib": memory_gib, **(extra or {}),
        }
        if self.enabled:
            self._write(record, "train", iteration % self.log_interval == 0)
        return record

    def log_eval(self, iteration: int, losses: Dict[str, float]) -> None:
        if self.enabled:
            self._write({"iteration": iteration, **{f"valid_{k}": v for k, v in losses.items()}},
                        "valid", True)

    def _write(self, record: Dict[str, float], group: str, to_stdout: bool) -> None:
        self.jsonl.write(json.dumps({"split": group, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{group}/{key}", value, record["iteration"])
            self.writer.flush()
        if to_stdout:
            print(_format(group, record), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _format(group: str, r: Dict[str, float]) -> str:
    def f(key: str, fmt: str) -> str:
        v = r.get(key)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    if group == "valid":
        body = " | ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("valid_"))
        return f"[valid] iter {r['iteration']} | {body}"
    parts = [f"iter {r['iteration']}", f"lm_loss {f('lm_loss', '.4f')}",
             f"vm_loss {f('vm_loss', '.4f')}", f"total {f('total_loss', '.4f')}",
             f"grad_norm {f('grad_norm', '.3f')}", f"lr {f('lr', '.3e')}",
             f"tokens/s {f('tokens_per_s', '.0f')}", f"samples/s {f('samples_per_s', '.2f')}",
             f"TFLOP/s/dev {f('tflops_per_device', '.3f')}"]
    if not math.isnan(r.get("mfu", float("nan"))):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {f('memory_gib', '.2f')} GiB")
    return "[train] " + " | ".join(parts)
