"""Step time of a small Llama-style decoder with each core attention (``model/attention.py``).

Forward + backward of a megatron ``GPTModel`` (RMSNorm, SwiGLU, RoPE, GQA; local layers) on one
sequence of ``--seq-length`` tokens, three ways, in one process and one run:

* ``unfused``: megatron's ``DotProductAttention`` (materialises the s x s scores), causal;
* ``sdpa``: ``SDPAttention``, causal (``is_causal``);
* ``sdpa packed``: ``SDPAttention`` on the same number of tokens packed from documents of
  ``--doc-length`` tokens (thd, ``PackedSeqParams``; on CPU the boolean document-causal mask,
  on CUDA FlexAttention), RoPE restarting per document.

The printed ratios come from the same run (median step time over ``--steps`` after one warm-up
step). The model is small so that attention, not the MLPs, dominates a step at 2k tokens.

    python benchmarks/attention_step.py [--seq-length 2048] [--doc-length 600] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vwlmm.parallel.launch import run_on_ranks  # noqa: E402

VOCAB = 1024


def _model(args, backend: str):
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_vwlmm.model.specs import decoder_layer_spec

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
        num_attention_heads=args.heads, num_query_groups=args.groups,
        kv_channels=args.hidden // args.heads, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    return GPTModel(config=config, transformer_layer_spec=decoder_layer_spec("local", backend),
                    vocab_size=VOCAB, max_sequence_length=args.seq_length,
                    position_embedding_type="rope")


def _packed_params(seq_length: int, doc_length: int):
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = list(range(0, seq_length, doc_length)) + [seq_length]
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest), len(bounds) - 1


def _step_times(model, tokens, steps: int, packed_seq_params=None) -> list:
    import torch

    times = []
    for _ in range(steps + 1):  # the first is warm-up
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logits = model(tokens, None, None, packed_seq_params=packed_seq_params)
        logits.float().mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def _bench(args) -> dict:
    import megatron.core
    import torch

    torch.set_num_threads(args.threads)
    tokens = torch.randint(0, VOCAB, (1, args.seq_length))
    params, n_docs = _packed_params(args.seq_length, args.doc_length)
    if torch.cuda.is_available():
        tokens, params.cu_seqlens_q = tokens.cuda(), params.cu_seqlens_q.cuda()
        params.cu_seqlens_kv = params.cu_seqlens_q
    runs = {}
    for name, backend, packed in (("unfused", "unfused", None), ("sdpa", "sdpa", None),
                                  ("sdpa packed", "sdpa", params)):
        model = _model(args, backend)
        if torch.cuda.is_available():
            model.cuda()
        ms = [1e3 * t for t in _step_times(model, tokens, args.steps, packed)]
        runs[name] = statistics.median(ms)
        print(f"  {name:12s} {runs[name]:8.0f} ms/step  (steps: "
              f"{', '.join(f'{m:.0f}' for m in ms)})", flush=True)
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": args.threads, "torch": torch.__version__,
        "megatron_core": megatron.core.__version__, "documents": n_docs,
        "step_ms": runs,
        "unfused_over_sdpa": runs["unfused"] / runs["sdpa"],
        "packed_over_sdpa": runs["sdpa packed"] / runs["sdpa"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per step")
    parser.add_argument("--doc-length", type=int, default=600,
                        help="document length of the packed run (the last is shorter)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    print(f"GPTModel {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
          f"{args.groups} groups, {args.seq_length} tokens, forward + backward:", flush=True)
    result = run_on_ranks(_bench, 1, args=(args,))[0]
    print(f"{result['device']} ({result['threads']} threads), torch {result['torch']}, "
          f"megatron-core {result['megatron_core']}: unfused / sdpa = "
          f"{result['unfused_over_sdpa']:.2f}x step time; packed ({result['documents']} "
          f"documents) / sdpa = {result['packed_over_sdpa']:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
