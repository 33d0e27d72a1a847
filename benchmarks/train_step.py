"""Training-step throughput of the real trainer, and the data loader's headroom over it.

CPU (default): the tiny model at TP=1, TP=2 and PP=2 (torchrun, gloo), tokens/s and samples/s
from the trainer's own metrics (median over the steps after warm-up), then the loader's
samples/s (real JPEG decode, CLIP normalisation and model collation, configured workers)
against the fastest layout's consumption rate (target: loader >= 5x consumption).

GPU (``--gpu``): one device, a ~1B-parameter Llama-shaped decoder with the frozen CLIP ViT-L/336
in bf16 on 2k-token sequences; prints tokens/s, TFLOP/s and MFU (``--peak-tflops``, default the
H100 SXM dense bf16 989).

    python benchmarks/train_step.py [--steps 8] [--gpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vwlmm.parallel.launch import find_free_port  # noqa: E402
from pipeline.data.synthetic import make_samples, write_dataset  # noqa: E402

GPU_1B = [  # ~1.0B decoder parameters (embeddings + LM/VM heads included: ~1.13B)
    "model.preset=vicuna-7b", "model.decoder.num_layers=16",
    "model.decoder.hidden_size=2048", "model.decoder.ffn_hidden_size=5632",
    "model.decoder.num_attention_heads=16",
    "model.decoder.num_query_groups=16", "model.decoder.seq_length=2048",
    "model.freeze_decoder=false", "model.transformer_impl=auto",
    "precision.bf16=true", "parallel.tp=1", "parallel.pp=1",
]


def run_trainer(nproc: int, data: Path, run_dir: Path, sets: list) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={find_free_port()}", "-m",
           "pipeline.train", "--config", str(REPO / "configs/tiny-cpu.yaml"),
           "--set", f"data.path={data}", "--set", f"run_dir={run_dir}",
           "--set", "logging.tensorboard=false", "--set", "train.eval_interval=0",
           "--set", "data.valid_fraction=0", "--set", "checkpoint.save_interval=0"]
    for s in sets:
        cmd += ["--set", s]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"train"' in line]


def summarize(records: list, warmup: int) -> dict:
    steady = records[warmup:] or records
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    return {"tokens_per_s": med("tokens_per_s"), "samples_per_s": med("samples_per_s"),
            "tflops_per_device": med("tflops_per_device"), "mfu": med("mfu"),
            "step_time_s": med("step_time_s"), "memory_gib": max(r["memory_gib"] for r in steady),
            "lm_loss_first": records[0]["lm_loss"], "lm_loss_last": records[-1]["lm_loss"]}


def loader_rate(data: Path, workers: int, mbs: int, seq_length: int, num_patches: int,
                image_size: int, n_microbatches: int) -> float:
    """samples/s of one rank's loader with the model's collation (first batch not timed)."""
    from pipeline.data.loader import LoaderSpec, RankData
    from pipeline.validate import load_manifest, select_shards
    from vwlmm_data.storage import S3Options

    manifest = load_manifest(str(data), S3Options())
    shards = select_shards(manifest, str(data), "arrow")
    spec = LoaderSpec(shards=tuple(shards), format="arrow", micro_batch_size=mbs,
                      global_batch_size=mbs, dp_size=1, dp_rank=0, seed=1,
                      seq_length=seq_length, num_patches=num_patches, image_size=image_size,
                      pad_token_id=0, vision=manifest.vision, num_workers=workers)
    it = RankData(spec).train_iterator(0)
    next(it)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, n_microbatches):
        pass
    return n_microbatches * mbs / (time.perf_counter() - t0)


def cpu(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vwlmm-bench-"))
    data = write_dataset(str(tmp / "data"), make_samples(64, seed=0), shard_size=16,
                         formats=("arrow",))
    common = [f"train.train_iters={args.steps}", "data.micro_batch_size=4",
              "data.global_batch_size=8", "data.num_workers=2"]
    results = {}
    for name, tp, pp in (("TP=1", 1, 1), ("TP=2", 2, 1), ("PP=2", 1, 2)):
        recs = run_trainer(tp * pp, Path(data), tmp / name.replace("=", ""),
                           common + [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        results[name] = summarize(recs, warmup=2)
        print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s, "
              f"{results[name]['samples_per_s']:.2f} samples/s, "
              f"step {results[name]['step_time_s'] * 1e3:.0f} ms", flush=True)
    consumption = max(r["samples_per_s"] for r in results.values())
    rate = loader_rate(Path(data), workers=2, mbs=4, seq_length=64, num_patches=16,
                       image_size=32, n_microbatches=40)
    results["loader"] = {"samples_per_s": rate, "consumption_samples_per_s": consumption,
                         "ratio": rate / consumption}
    print(f"loader (2 workers): {rate:.1f} samples/s = {rate / consumption:.1f}x the fastest "
          f"step's consumption ({consumption:.2f} samples/s); target >= 5x", flush=True)
    return results


def gpu(args) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="vwlmm-bench-"))
    # 336 px images (576 patches) + ~1400 caption tokens: ~2k positions per sequence.
    data = write_dataset(str(tmp / "data"), make_samples(256, image_size=336, seed=0,
                                                         caption_len=1400),
                         shard_size=64, image_size=336, num_patches=576,
                         formats=("arrow",), max_seq_len=2048)
    sets = GPU_1B + [f"train.train_iters={args.steps}", f"data.micro_batch_size={args.mbs}",
                     f"data.global_batch_size={args.mbs * args.accum}", "data.num_workers=4",
                     f"logging.peak_tflops_per_device={args.peak_tflops}",
                     "optim.lr=1e-4", "optim.min_lr=0", "optim.warmup_iters=1",
                     f"parallel.recompute_granularity={args.recompute}"
                     if args.recompute else "parallel.recompute_granularity=null"]
    recs = run_trainer(1, Path(data), tmp / "gpu1b", sets)
    out = summarize(recs, warmup=2)
    out["device"] = torch.cuda.get_device_name(0)
    rate = loader_rate(Path(data), workers=4, mbs=args.mbs, seq_length=2048, num_patches=576,
                       image_size=336, n_microbatches=16)
    out["loader_samples_per_s"] = rate
    print(f"{out['device']}: ~1B decoder bf16, seq 2048, micro-batch {args.mbs} x {args.accum}: "
          f"{out['tokens_per_s']:.0f} tokens/s, {out['tflops_per_device']:.1f} TFLOP/s, "
          f"MFU {100 * out['mfu']:.1f}% (peak {args.peak_tflops}), "
          f"step {out['step_time_s']:.2f} s, peak memory {out['memory_gib']:.1f} GiB; "
          f"loader {rate:.1f} samples/s vs {out['samples_per_s']:.2f} consumed", flush=True)
    return {"gpu_1b": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per layout (default 8)")
    parser.add_argument("--gpu", action="store_true", help="run the 1-GPU ~1B bf16 benchmark")
    parser.add_argument("--mbs", type=int, default=4, help="GPU micro-batch size (default 4)")
    parser.add_argument("--accum", type=int, default=2, help="GPU micro-batches per step")
    parser.add_argument("--recompute", default=None, help="GPU: null | selective | full")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = gpu(args) if args.gpu else cpu(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
