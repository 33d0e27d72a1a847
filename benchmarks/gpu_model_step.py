"""One-GPU training-step throughput and MFU of VW-LMM in bf16 (not a test; needs CUDA).

Runs the real stack: ``initialize_distributed`` (NCCL), ``VWLMMModel`` with a ~1B-parameter
Llama-style decoder and the CLIP ViT-L/14-336 encoder (frozen), megatron DDP + distributed
optimizer (Adam, bf16 params with fp32 main weights), megatron's forward-backward schedule.
Prints tokens/s, TFLOP/s and MFU (model FLOPs as ``pipeline.flops.step_flops`` counts them,
against ``--peak-tflops``, default 989 = H100/H200 SXM dense bf16).

    torchrun --nproc_per_node 1 --master_port 29611 benchmarks/gpu_model_step.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--images-per-sample", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--recompute", action="store_true", help="full activation recompute")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vwlmm.model import VWLMMBatch, build_model, get_preset
    from megatron_vwlmm.model.config import RuntimeOptions
    from megatron_vwlmm.model.forward_step import forward_step
    from megatron_vwlmm.parallel.initialize import initialize_distributed
    from megatron_vwlmm.parallel.stage_replicas import finalize_model_grads
    from pipeline.flops import step_flops

    initialize_distributed(tp=1, pp=1)
    config = get_preset(
        "vicuna-7b", vision="clip-vit-l-14-336", bf16=True,
        **{"decoder.num_layers": args.layers, "decoder.hidden_size": args.hidden,
           "decoder.ffn_hidden_size": args.ffn, "decoder.num_attention_heads": args.heads,
           "decoder.num_query_groups": args.groups, "decoder.seq_length": args.seq_length},
    )
    runtime = RuntimeOptions(recompute_granularity="full", recompute_method="uniform",
                             recompute_num_layers=1) if args.recompute else RuntimeOptions()
    model = build_model(config, runtime=runtime).cuda()
    decoder_params = sum(p.numel() for p in model.language_model.parameters())
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, use_distributed_optimizer=True,
                        clip_grad=1.0), [ddp])

    b, s, n_img = args.micro_batch, args.seq_length, args.images_per_sample
    patches = config.num_patches
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(3, config.decoder.vocab_size, (b, s), device=device, generator=g)
    mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    mask[:, 1:1 + n_img * patches] = True
    labels = tokens.clone()
    labels[mask] = -100
    labels[:, 0] = -100
    images = torch.randn(b * n_img, 3, 336, 336, device=device, generator=g)
    batch = VWLMMBatch(tokens=tokens, labels=labels, image_token_mask=mask, images=images)

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=lambda it, m: forward_step(next(it), m),
            data_iterator=iter([batch] * args.micro_batches), model=[ddp],
            num_microbatches=args.micro_batches, seq_length=s, micro_batch_size=b,
            forward_only=False)
        optimizer.step()
        return losses

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    sequences = b * args.micro_batches
    flops = step_flops(config, sequences, s, sequences * n_img)
    tflops = flops / step_time / 1e12
    print(f"device: {_device_name()}  torch {torch.__version__}")
    print(f"decoder params: {decoder_params / 1e9:.3f} B  (layers={args.layers} h={args.hidden} "
          f"ffn={args.ffn}), vision CLIP-L/14-336 frozen, layer impl: local spec (no TE)")
    print(f"global batch: {sequences} x {s} tokens, {n_img} image(s)/sample, "
          f"recompute={'full' if args.recompute else 'off'}")
    print(f"last losses: lm={float(losses[-1]['lm_loss']):.4f} vm={float(losses[-1]['vm_loss']):.4f}")
    print(f"step time (median of {args.steps}): {step_time * 1e3:.1f} ms")
    print(f"tokens/s: {sequences * s / step_time:,.0f}")
    print(f"model TFLOP/s: {tflops:.1f}   MFU: {100 * tflops / args.peak_tflops:.1f}% "
          f"of {args.peak_tflops:.0f}")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
