"""Benchmark: vocab-parallel ``visual_word_kl`` vs the naive full-vocabulary KL, forward + backward.

Naive is what one writes without the kernel (at TP=1 the "gather" is a no-op):

    F.kl_div(F.log_softmax(s.float()), F.softmax(z.float()), reduction="none").sum(-1)

with the fp32 upcast that any bf16 training run needs for a stable loss. Both sides get fresh
leaf logits each repetition and run forward + ``.sum().backward()``; the printed ratios are
``visual_word_kl / naive`` from the same run (median over repetitions after warm-up).

Peak extra memory = the most bytes live above the level before the call, gradients of the two
logit tensors included (they are the same size for both sides, so the floor for any method is
2 x N x V in the input dtype). Measured:
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
    allocated before the call; time with CUDA events.
  - CPU: the CPU allocator reports every allocation and free to ``torch.profiler`` when
    ``profile_memory=True``; replaying those events in time order gives the exact live-bytes
    curve and its peak (allocator-level, so temporaries inside ATen kernels count; RSS would
    also count glibc caching and untouched pages). Memory is taken in a separate, untimed run
    because the profiler slows the ops; time with ``time.perf_counter``.

Example: ``python benchmarks/visual_word_kl.py`` (N=2304 image positions = 4 images x 576
patches, V=32000, fp32 and bf16, device picked automatically).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_vwlmm.losses import visual_word_kl

LOG = logging.getLogger("benchmarks.visual_word_kl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


def naive_kl(mm_logits: torch.Tensor, vm_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocab KL(softmax(z) || softmax(s)) per position, materialising [N, V] fp32 tensors."""
    return F.kl_div(
        F.log_softmax(mm_logits.float(), dim=-1),
        F.softmax(vm_logits.float(), dim=-1),
        reduction="none",
    ).sum(-1)


@dataclass
class Measurement:
    median_ms: float
    peak_extra_bytes: int
    kl: torch.Tensor


def _forward_backward(fn: Callable, mm: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    mm_leaf, vm_leaf = mm.detach().requires_grad_(), vm.detach().requires_grad_()
    kl = fn(mm_leaf, vm_leaf)
    kl.sum().backward()
    return kl.detach()


def _time_ms(fn: Callable, mm, vm, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _forward_backward(fn, mm, vm)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    _forward_backward(fn, mm, vm)
    return (time.perf_counter() - start_s) * 1e3


def _peak_extra_bytes(fn: Callable, mm, vm, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _forward_backward(fn, mm, vm)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(fn, mm, vm)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(fn: Callable, mm, vm, device: torch.device, warmup: int, repeats: int) -> Measurement:
    kl = None
    for _ in range(warmup):
        kl = _forward_backward(fn, mm, vm)
    times = [_time_ms(fn, mm, vm, device) for _ in range(repeats)]
    if kl is None:
        kl = _forward_backward(fn, mm, vm)
    return Measurement(statistics.median(times), _peak_extra_bytes(fn, mm, vm, device), kl)


def _chunk_size(text: str):
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive int, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints one row per dtype with time and peak-extra-memory ratios (ours / naive); "
        "targets: memory <= 0.5x, time <= 1.0x.",
    )
    parser.add_argument("--positions", type=int, default=2304, help="N, image positions (default 2304)")
    parser.add_argument("--vocab", type=int, default=32000, help="V, vocabulary size (default 32000)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
        help="logit dtypes to run (default: fp32 bf16)",
    )
    parser.add_argument(
        "--chunk-sizes", type=_chunk_size, nargs="+", default=[None],
        help="visual_word_kl chunk sizes (positions) to compare; 'auto' is the library's "
        "per-device default (default: auto)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; median reported (default 5)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto = cuda when available, else cpu",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("positions", "vocab", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads"
    )
    LOG.info("device %s; N=%d V=%d; torch %s", name, args.positions, args.vocab, torch.__version__)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    for dtype_name in args.dtypes:
        shape = (args.positions, args.vocab)
        mm = (torch.randn(shape, generator=gen, device=device) * 3).to(DTYPES[dtype_name])
        vm = (torch.randn(shape, generator=gen, device=device) * 3).to(DTYPES[dtype_name])
        LOG.info("%s: naive ...", dtype_name)
        naive = measure(naive_kl, mm, vm, device, args.warmup, args.repeats)
        for chunk_size in args.chunk_sizes:
            label = "auto" if chunk_size is None else str(chunk_size)
            LOG.info("%s: visual_word_kl chunk_size=%s ...", dtype_name, label)
            ours = measure(
                lambda s, z, c=chunk_size: visual_word_kl(s, z, chunk_size=c),
                mm, vm, device, args.warmup, args.repeats,
            )
            max_diff = (ours.kl - naive.kl).abs().max().item() if args.positions else 0.0
            rows.append((dtype_name, label, naive, ours, max_diff))
        del mm, vm

    grads_mib = {d: 2 * args.positions * args.vocab * DTYPES[d].itemsize / MIB for d in DTYPES}
    header = (
        f"{'dtype':5} {'chunk':>7} {'naive ms':>9} {'ours ms':>9} {'time x':>7} "
        f"{'naive MiB':>10} {'ours MiB':>9} {'mem x':>6} {'grads MiB':>9} {'max|dKL|':>9}"
    )
    print(f"\nvisual_word_kl vs naive, forward+backward, N={args.positions} V={args.vocab}, {name}")
    print(header)
    print("-" * len(header))
    for dtype_name, label, naive, ours, max_diff in rows:
        print(
            f"{dtype_name:5} {label:>7} {naive.median_ms:9.1f} {ours.median_ms:9.1f} "
            f"{ours.median_ms / naive.median_ms:7.2f} {naive.peak_extra_bytes / MIB:10.1f} "
            f"{ours.peak_extra_bytes / MIB:9.1f} "
            f"{ours.peak_extra_bytes / naive.peak_extra_bytes:6.2f} "
            f"{grads_mib[dtype_name]:9.1f} {max_diff:9.2e}"
        )
    print("targets: time x <= 1.0, mem x <= 0.5 (peak extra memory includes the input gradients)")


if __name__ == "__main__":
    main()
