"""Useful work per second with sequence packing vs padding, on realistically shaped data.

Every figure comes from the real trainer's own metrics (median over the steps after warm-up):
``samples_per_s``, ``tokens_per_s`` (non-padding positions only), ``padding_fraction`` and MFU
from useful FLOPs (``pipeline/flops.py``: positions samples occupy, attention over each sample's
own square). Runs compared against each other share the model, the data, the global batch
(in samples) and the machine, inside one invocation.

CPU (default): the stage-1 shape scaled down. A small decoder (``CPU_MODEL``; frozen as in
stage 1: adapter and VM head trained) with rows of 224 positions and 64-patch images, i.e. image
positions ~29% of a row as LCS-558K's 576 of 2048, and captions of 2-8 tokens (LCS captions
are short): samples of 67-73 positions, three to a packed row. Padded vs packed, one row per
micro-batch each; target: packed samples/s >= 2.5x padded.

GPU (``--gpu``, one device, under 8 minutes): a ~1B Llama-shaped decoder + the frozen CLIP
ViT-L/336 in bf16, rows of 2048, on a stage-1-shaped (576 patches + 8-60 caption tokens) and a
stage-2-shaped (576 patches + 40-1400 tokens) length distribution: padded with megatron's
unfused attention (the old path), padded with SDPA, packed with SDPA. Reports useful-token MFU
(``--peak-tflops``, default H100 SXM dense bf16 989). ``--gpu-smoke`` runs the same plan with
tiny sizes on CPU, to check the script before spending device time.

    python benchmarks/packing_throughput.py [--steps 6] [--gpu | --gpu-smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import GPU_1B, run_trainer  # noqa: E402
from pipeline.data.synthetic import make_samples, write_dataset  # noqa: E402

# A decoder whose layers dominate the step, as a 7B decoder's do (the tiny preset's 64-wide
# layers are dwarfed by its 32000-way heads): 256 wide, 4 layers, GQA, a 2048-token vocabulary
# (the synthetic captions use ids < 1000), rows of 224 with 64-patch images.
CPU_MODEL = ["model.decoder.seq_length=224", "model.decoder.hidden_size=256",
             "model.decoder.ffn_hidden_size=688",
             "model.decoder.num_attention_heads=8",
             "model.decoder.num_query_groups=2", "model.decoder.vocab_size=2048",
             "model.vision.image_size=64", "model.freeze_decoder=true",
             "parallel.tp=1", "parallel.pp=1", "data.num_workers=1"]
PACKED = ["data.packing=true", "optim.loss_normalization=per_token"]


def summarize(records: list, warmup: int) -> dict:
    steady = records[warmup:] or records
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    return {k: med(k) for k in ("samples_per_s", "tokens_per_s", "padding_fraction",
                                 "tflops_per_device", "mfu", "step_time_s", "micro_batches")} | \
        {"memory_gib": max(r["memory_gib"] for r in steady)}


def _line(name: str, r: dict) -> str:
    mfu = "" if r["mfu"] != r["mfu"] else f", useful-token MFU {100 * r['mfu']:.1f}%"
    return (f"{name}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} useful "
            f"tokens/s, padding {100 * r['padding_fraction']:.0f}%, "
            f"{r['micro_batches']:.0f} micro-batches/step, step {r['step_time_s']:.2f} s"
            f"{mfu}, peak memory {r['memory_gib']:.1f} GiB")


def compare(tmp: Path, data: Path, base: list, variants: dict, warmup: int) -> dict:
    out = {}
    for name, sets in variants.items():
        out[name] = summarize(run_trainer(1, data, tmp / name, base + sets), warmup)
        print(_line(name, out[name]), flush=True)
    return out


def cpu(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vwlmm-bench-"))
    data = Path(write_dataset(str(tmp / "stage1"), make_samples(240, image_size=64, seed=0,
                                                                  caption_len=(2, 8)),
                              shard_size=60, image_size=64, num_patches=64, formats=("arrow",),
                              max_seq_len=224, vocab_size=2048))
    base = CPU_MODEL + [f"train.train_iters={args.steps}", "data.global_batch_size=36",
                        "data.micro_batch_size=1"]
    results = compare(tmp, data, base, {"padded": [], "packed": PACKED}, warmup=2)
    ratio = results["packed"]["samples_per_s"] / results["padded"]["samples_per_s"]
    results["packed_over_padded_samples_per_s"] = ratio
    print(f"packed / padded samples/s: {ratio:.2f}x (target >= 2.5x)", flush=True)
    return results


def gpu_plan(smoke: bool) -> tuple:
    """(model sets, vocabulary, rows, patches, image size, shapes {name: caption range}, steps,
    mbs, gbs)."""
    if smoke:
        return CPU_MODEL, 2048, 224, 64, 64, {"stage1": (4, 16), "stage2": (4, 150)}, 3, 2, 12
    return GPU_1B, 32000, 2048, 576, 336, {"stage1": (8, 60), "stage2": (40, 1400)}, 8, 2, 32


def gpu(args) -> dict:
    model, vocab, rows, patches, image, shapes, steps, mbs, gbs = gpu_plan(args.gpu_smoke)
    tmp = Path(tempfile.mkdtemp(prefix="vwlmm-bench-"))
    results = {}
    if not args.gpu_smoke:
        import torch

        results["device"] = torch.cuda.get_device_name(0)
        results["torch"] = torch.__version__
        import megatron.core

        results["megatron_core"] = megatron.core.__version__
        print(f"{results['device']}, torch {results['torch']}, megatron-core "
              f"{results['megatron_core']}", flush=True)
    base = model + [f"train.train_iters={args.steps or steps}", f"data.micro_batch_size={mbs}",
                    f"data.global_batch_size={gbs}", "data.num_workers=4",
                    f"logging.peak_tflops_per_device={args.peak_tflops}", "optim.lr=1e-4",
                    "optim.min_lr=0", "optim.warmup_iters=1"]
    for shape, captions in shapes.items():
        data = Path(write_dataset(str(tmp / shape), make_samples(
            gbs * ((args.steps or steps) + 1), image_size=image, seed=1, caption_len=captions),
            shard_size=64, image_size=image, num_patches=patches, formats=("arrow",),
            max_seq_len=rows, vocab_size=vocab))
        variants = {f"{shape}-padded-unfused": ["model.attention_backend=unfused"],
                    f"{shape}-padded-sdpa": ["model.attention_backend=sdpa"],
                    f"{shape}-packed-sdpa": ["model.attention_backend=sdpa", *PACKED]}
        if shape != "stage1":
            variants.pop(f"{shape}-padded-unfused")  # device time: the old path once
        results.update(compare(tmp, data, base, variants, warmup=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default 6 on CPU, 8 on GPU, 3 for --gpu-smoke)")
    parser.add_argument("--gpu", action="store_true", help="the 1-GPU ~1B bf16 comparison")
    parser.add_argument("--gpu-smoke", action="store_true",
                        help="the GPU plan with tiny sizes on CPU (checks the script)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    if args.gpu or args.gpu_smoke:
        results = gpu(args)
    else:
        args.steps = args.steps or 6
        results = cpu(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
