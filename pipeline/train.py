"""VW-LMM pretraining entry point (torchrun / srun): ``python -m pipeline.train --config X.yaml``.

One process per device. ``run`` checks everything that can be checked before a process group
exists (layout, model, data manifest, initial weights), starts megatron's process groups and
hands over to ``pipeline/trainer.py``'s ``Trainer``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from pipeline.config import ConfigError, TrainConfig, describe_fields, load_config
from pipeline.validate import (check_fp8_available, check_init_from, check_layout, check_manifest,
                               check_model, check_resume, load_manifest, select_shards)
from vwlmm_data.errors import Refusal, last_line

# megatron's distributed optimizer zeroes gradients by probing ``.grad`` on every tensor of its
# groups, views of the fp32 main shards included (its ``_zero_grad_group_helper``): torch warns
# on each step about a harmless read.
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf",
                        category=UserWarning)


def quiet_library_warnings(verbose: bool) -> None:
    """Hide the known library warnings (``megatron_compat.quiet_known_warnings``); rank 0 says
    in one line what they meant."""
    if verbose:
        return
    import importlib.util

    from megatron_vwlmm.parallel.megatron_compat import quiet_known_warnings

    quiet_known_warnings()
    if os.environ.get("RANK", "0") == "0" and importlib.util.find_spec("transformer_engine") \
            is None:
        print("[vwlmm-train] Transformer Engine not installed: megatron-core's local layers "
              "and torch SDPA attention (logging.verbose=true shows every library warning)",
              flush=True)


@dataclass
class Preflight:
    """What the checks made before any process group found out."""

    dp_size: int
    model_cfg: Any
    s3: Any
    manifest: Any  # None: --check without a dataset yet
    shards: Any


def preflight(cfg: TrainConfig, world_size: int, launching: bool) -> Preflight:
    """Every check that needs no process group: the layout, the model shape, FP8 (``launching``:
    a check on a laptop may plan a GPU run), the dataset (required when ``launching``), the
    initial weights and the checkpoint a run would resume. ``run`` and ``--check`` share it."""
    from vwlmm_data.storage import S3Options, exists, join

    dp_size = check_layout(cfg, world_size)
    if launching:
        check_fp8_available(cfg)
    model_cfg = cfg.model.vwlmm()
    check_model(model_cfg, cfg)
    s3 = S3Options(cfg.data.s3_endpoint_url, cfg.data.s3_region)
    if launching and not cfg.data.path:
        raise ConfigError("data.path: required (the preprocessing output folder or s3:// URL)")
    manifest = shards = None
    if launching or (cfg.data.path and exists(join(cfg.data.path, "manifest.json"), s3)):
        manifest = load_manifest(cfg.data.path, s3)
        check_init_from(model_cfg, cfg, manifest)
        check_manifest(manifest, model_cfg, cfg)
        check_resume(cfg, model_cfg, manifest)
        shards = select_shards(manifest, cfg.data.path, cfg.data.format)
    return Preflight(dp_size, model_cfg, s3, manifest, shards)


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train as configured; returns a summary (last metrics, final checkpoint) on every rank."""
    from megatron_vwlmm.parallel.initialize import destroy_distributed, initialize_distributed
    from pipeline.signals import PreemptionFlag
    from pipeline.trainer import Trainer
    from vwlmm_data.run_lock import RunLock

    pf = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), launching=True)
    with contextlib.ExitStack() as held:
        if os.environ.get("RANK", "0") == "0":
            # One job per run folder: a resubmitted job refuses while the first one runs (the
            # lock of a killed job is taken over), naming its host and PID.
            for folder in _run_folders(cfg):
                held.enter_context(RunLock(str(folder), "vwlmm-train"))
        initialize_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp,
                               seed=cfg.train.seed, backend=cfg.parallel.backend,
                               timeout_s=cfg.parallel.timeout_s)
        preempt = PreemptionFlag(cfg.checkpoint.save_on_signal)
        try:
            return Trainer(cfg, pf.manifest, pf.shards, pf.s3, pf.dp_size, preempt).train()
        finally:
            preempt.restore()
            destroy_distributed()


def _run_folders(cfg: TrainConfig) -> list:
    """The folders a run writes: run_dir, and checkpoint.dir when it lies elsewhere."""
    run_dir, ckpt = Path(cfg.run_dir).resolve(), cfg.checkpoint_dir.resolve()
    return [run_dir] if ckpt.is_relative_to(run_dir) else [run_dir, ckpt]


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
    parser.add_argument("--check", action="store_true",
                        help="validate the whole config for --gpus processes without starting "
                             "any (layout, model shape, the dataset when data.path exists), "
                             "print the layout and the schedule per epoch, and exit")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="world size for --check and --plan (default: $WORLD_SIZE or 1)")
    parser.add_argument("--plan", action="store_true",
                        help="size the run for --gpus cards of --gpu-memory without starting "
                             "anything (pipeline/plan.py): per stage the bytes of parameters, "
                             "gradients, optimizer state and activations, the peak, whether "
                             "it fits and, if not, the smallest TP/PP/recompute/micro-batch "
                             "change that does; exits 0 when it fits, 3 when it does not")
    parser.add_argument("--gpu-memory", default="80GiB", metavar="SIZE",
                        help="memory of one card for --plan (default 80GiB; 40GB is read as "
                             "40 GiB)")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                        help="dense bf16 peak of one card in TFLOP/s (H100 SXM: 989): --plan "
                             "adds the expected step time and MFU")
    return parser.parse_args(argv)


def check(cfg: TrainConfig, world_size: int) -> str:
    """What ``--check`` prints: the layout and the schedule, after ``preflight``."""
    pf = preflight(cfg, world_size, launching=False)
    p, d, dp = cfg.parallel, cfg.data, pf.dp_size
    lines = [f"layout: {world_size} processes = TP {p.tp} x PP {p.pp}"
             + (f" (x {p.vpp} virtual stages)" if p.vpp else "") + f" x DP {dp}",
             f"step: global batch {d.global_batch_size} samples = DP {dp} x "
             + (f"packed rows of {pf.model_cfg.decoder.seq_length} tokens, "
                f"{d.micro_batch_size} row(s) per micro-batch" if d.packing else
                f"{d.global_batch_size // (d.micro_batch_size * dp)} micro-batch(es) of "
                f"{d.micro_batch_size}")]
    if pf.manifest is not None:
        samples = int(pf.manifest.num_samples * (1 - d.valid_fraction))
        lines.append(f"epoch: ~{samples} training samples = {samples / d.global_batch_size:.1f} "
                     f"iterations; train.train_iters={cfg.train.train_iters} is "
                     f"{cfg.train.train_iters * d.global_batch_size / max(samples, 1):.2f} "
                     "epoch(s)")
    else:
        lines.append(f"data: {d.path or '(data.path unset)'} has no manifest.json yet; "
                     "the dataset is checked at launch")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return
        if args.check:
            world = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
            print(check(cfg, world))
            print("config check passed", flush=True)
            return
        if args.plan:
            from pipeline.plan import main as plan_main

            world = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
            sys.exit(plan_main(cfg, world, args.gpu_memory, args.peak_tflops))
        quiet_library_warnings(cfg.logging.verbose)
        run(cfg)
    except ConfigError as exc:
        # Every rank finds the same error: the first one says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Refusal as exc:
        # A loader worker's error arrives wrapped with its traceback: its last line is the
        # message.
        message = last_line(exc) or type(exc).__name__
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not exc.same_on_every_rank:
            print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
