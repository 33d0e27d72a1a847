"""Run a function on N real gloo processes with megatron's parallel state initialised.

The one shared helper for distributed tests and CPU benchmarks: processes are started with the
``spawn`` context (fresh interpreters, as torchrun gives), on a free loopback port, and every
rank's return value or traceback is collected. Starting a rank costs several seconds of imports,
so callers should batch many checks into one launch.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _rank_main(rank, world_size, port, tp, pp, vpp, seed, fn, args, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from megatron_vwlmm.parallel.initialize import destroy_distributed, initialize_distributed

    try:
        initialize_distributed(tp=tp, pp=pp, vpp=vpp, seed=seed, timeout_s=300)
        results[rank] = ("ok", _to_cpu(fn(*args)))
    except BaseException:  # reported to the parent with the rank's traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        try:
            destroy_distributed()
        except Exception:
            pass


class DistributedRunError(RuntimeError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    args: Sequence[Any] = (),
    timeout_s: float = 300,
) -> list:
    """Call ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``fn`` must be importable by name (module level), since spawn pickles it. Tensors in the
    results come back on CPU.
    """
    ctx = mp.get_context("spawn")
    port = find_free_port()
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, port, tp, pp, vpp, seed, fn, tuple(args), results),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout_s)
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for rank in hung:
            procs[rank].kill()
        collected = dict(results)
    errors = []
    for rank in range(world_size):
        status, payload = collected.get(rank, ("error", None))
        if rank in hung:
            errors.append(f"rank {rank}: timed out after {timeout_s:.0f} s")
        elif status != "ok":
            detail = payload or f"exited with code {procs[rank].exitcode} without a result"
            errors.append(f"rank {rank}:\n{detail}")
    if errors:
        raise DistributedRunError("\n".join(errors))
    return [collected[rank][1] for rank in range(world_size)]
