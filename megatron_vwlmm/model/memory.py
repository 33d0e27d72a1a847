"""Closed-form sizes of one VW-LMM pipeline chunk: its parameter tensors and the bytes one
micro-batch saves for backward.

Pure arithmetic on a ``VWLMMConfig`` (no torch, no process group), so a layout can be sized for
any GPU count in milliseconds (``pipeline/plan.py``). Two contracts, each checked against the
real model (``tests/megatron_vwlmm/model/test_memory.py``):

- :func:`chunk_parameters` lists the parameters of one chunk in ``named_parameters()`` order
  with their shard sizes under tensor parallelism, what is frozen and what is a stage replica
  (``vwlmm_model.py``: the last stage's vision encoder and adapter copy, PIF's first-stage VM
  head). megatron's DDP lays its grad buffer out from that order (reverse, with padding under the
  distributed optimizer), so the order is part of the contract.
- :func:`activation_bytes` counts the tensors autograd keeps alive between forward and backward,
  per part of the chunk, for megatron-core's local layers with ``model/attention.py``'s SDPA
  attention (the CPU and non-TE path): per decoder layer the RMSNorm input, ``1/rms`` and
  normalised output, the linear inputs, q, k, the fused qkv output (v is a view of it),
  attention output and its fp32 log-sum-exp, RoPE's cos/sin, the SwiGLU MLP's fc1 output, SiLU
  and product; selective recompute (megatron's ``core_attn``) drops the log-sum-exp, full
  recompute keeps each layer's input only; sequence parallelism keeps ``1/tp`` of the norms'
  tensors, the column-parallel linears' inputs and the checkpointed inputs. The heads keep the fp32 softmax of the MM logits
  (megatron's ``vocab_parallel_cross_entropy``) and, for the visual-word KL
  (``losses/vocab_parallel_kl.py``), the gathered prediction and target rows of the image
  positions plus five fp32 statistics each. A frozen vision encoder runs under ``no_grad`` and
  keeps nothing; a trainable one keeps what ``_vision_bytes`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from vwlmm_data.encoders import get_encoder_kind

INT64, BOOL, FP32 = 8, 1, 4


@dataclass(frozen=True)
class ParamTensor:
    """One parameter of a chunk: its element count on this TP rank, whether it trains, and
    whether it is a stage replica (megatron's DDP gives each its own bucket)."""

    name: str
    numel: int
    trainable: bool
    stage_replica: bool = False


def _decoder_layer(config, tp: int, prefix: str, trainable: bool) -> List[ParamTensor]:
    d = config.decoder
    h, f = d.hidden_size, d.ffn_hidden_size
    kv = d.num_query_groups * (h // d.num_attention_heads)
    shapes = (("input_layernorm.weight", h),
              ("self_attention.linear_proj.weight", h * h // tp),
              ("self_attention.linear_qkv.weight", (h + 2 * kv) // tp * h),
              ("pre_mlp_layernorm.weight", h),
              ("mlp.linear_fc1.weight", 2 * f // tp * h),
              ("mlp.linear_fc2.weight", h * f // tp))
    return [ParamTensor(prefix + name, n, trainable) for name, n in shapes]


def _vision(config, tp: int, replica: bool) -> List[ParamTensor]:
    v = config.vision
    hv, fv = v.hidden_size, v.ffn_hidden_size
    trainable = not config.freeze_vision
    class_tokens = get_encoder_kind(v.kind).num_class_tokens
    stem = []
    if class_tokens:  # CLIP: class token and pre-LayerNorm, patch conv without bias
        stem += [("class_token", class_tokens * hv), ("ln_pre.weight", hv), ("ln_pre.bias", hv),
                 ("conv1.weight", hv * 3 * v.patch_size ** 2)]
    else:  # SigLIP: patch conv with bias
        stem += [("conv1.weight", hv * 3 * v.patch_size ** 2), ("conv1.bias", hv)]
    stem.append(("position_embeddings.weight", (v.num_patches + class_tokens) * hv))
    layer = (("input_layernorm.weight", hv), ("input_layernorm.bias", hv),
             ("self_attention.linear_proj.weight", hv * hv // tp),
             ("self_attention.linear_proj.bias", hv),
             ("self_attention.linear_qkv.weight", 3 * hv // tp * hv),
             ("self_attention.linear_qkv.bias", 3 * hv // tp),
             ("pre_mlp_layernorm.weight", hv), ("pre_mlp_layernorm.bias", hv),
             ("mlp.linear_fc1.weight", fv // tp * hv), ("mlp.linear_fc1.bias", fv // tp),
             ("mlp.linear_fc2.weight", hv * fv // tp), ("mlp.linear_fc2.bias", hv))
    names = [(f"vision_model.{n}", k) for n, k in stem]
    names += [(f"vision_model.decoder.layers.{i}.{n}", k)
              for i in range(v.num_layers_run) for n, k in layer]
    return [ParamTensor(n, k, trainable, replica) for n, k in names]


def chunk_parameters(config, *, tp: int, pp: int, pre_process: bool, post_process: bool,
                     num_layers: int, first_layer: int = 0) -> List[ParamTensor]:
    """The parameters of one chunk (``VWLMMModel(pre_process, post_process)`` holding
    ``num_layers`` decoder layers) in ``named_parameters()`` order."""
    d = config.decoder
    h, vocab = d.hidden_size, d.vocab_size // tp
    lm = not config.freeze_decoder
    params: List[ParamTensor] = []
    if pre_process:
        params.append(ParamTensor("language_model.embedding.word_embeddings.weight",
                                  vocab * h, lm))
    for i in range(num_layers):
        params += _decoder_layer(config, tp, f"language_model.decoder.layers.{first_layer + i}.",
                                 lm)
    if post_process:
        params += [ParamTensor("language_model.decoder.final_layernorm.weight", h, lm),
                   ParamTensor("language_model.output_layer.weight", vocab * h, lm)]
    # vwlmm_model.py's _mark_stage_replicas: at PP > 1 the first and the last stage both hold
    # the encoder and the adapter (and, with PIF, the VM head), every copy marked.
    split = pp > 1 and pre_process != post_process
    if pre_process or post_process:
        params += _vision(config, tp, replica=split)
        adapter = not config.freeze_adapter
        params += [ParamTensor("adapter.encoder.linear_fc1.weight",
                               h // tp * config.vision.hidden_size, adapter, split),
                   ParamTensor("adapter.encoder.linear_fc1.bias", h // tp, adapter, split),
                   ParamTensor("adapter.encoder.linear_fc2.weight", h * h // tp, adapter, split),
                   ParamTensor("adapter.encoder.linear_fc2.bias", h, adapter, split)]
    if post_process or (config.pif and pre_process):
        params.append(ParamTensor("vm_head.weight", vocab * h, not config.freeze_vm_head,
                                  split and config.pif))
    return params


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatchShape:
    """What one micro-batch feeds the model: ``rows`` x ``seq_length`` positions (a packed
    micro-batch is one sequence of that many), ``image_positions`` spliced image rows, of which
    ``kl_positions`` have a predecessor in their own sample (the KL's targets)."""

    rows: int
    seq_length: int
    image_positions: int
    kl_positions: int
    packed: bool = False

    @property
    def positions(self) -> int:
        return self.rows * self.seq_length


def decoder_layer_bytes(config, shape: MicroBatchShape, *, tp: int,
                        recompute: Optional[str], act_bytes: int,
                        sequence_parallel: bool = False) -> int:
    """Bytes one decoder layer keeps for backward (without recompute: see the module
    docstring for the tensors). Under sequence parallelism the norms' tensors, the
    column-parallel linears' saved inputs (megatron keeps the rank's share and gathers again in
    backward) and a checkpointed layer's input are ``1/tp`` of the sequence."""
    d = config.decoder
    h, f, heads = d.hidden_size, d.ffn_hidden_size, d.num_attention_heads
    head_dim = h // heads
    kv = d.num_query_groups * head_dim
    t = shape.positions
    sp = tp if sequence_parallel else 1
    if recompute == "full":
        return t * h * act_bytes // sp  # the checkpointed layer's input
    norms = 2 * (2 * h + 1)  # input, 1/rms, normalised output; twice
    linear_inputs = 2 * h  # qkv and fc1 read the normalised hidden states
    attention = (h + kv + (h + 2 * kv) + h) // tp  # q, k, fused qkv output (v), output
    mlp = 5 * f // tp  # fc1 output (2f), SiLU output, product (fc2's input)
    per_position = ((norms + linear_inputs) / sp + attention + mlp) * act_bytes
    if recompute != "selective":
        per_position += heads // tp * FP32  # SDPA's log-sum-exp
    rope = 4 * _rope_positions(shape) * head_dim * act_bytes  # cos, sin for q and k
    return int(t * per_position) + rope


def _rope_positions(shape: MicroBatchShape) -> int:
    return shape.positions if shape.packed else shape.seq_length


def activation_bytes(config, shape: MicroBatchShape, *, tp: int, num_layers: int,
                     pre_process: bool, post_process: bool, recompute: Optional[str] = None,
                     act_bytes: int = 2, sequence_parallel: bool = False,
                     recompute_vision: bool = False) -> Dict[str, int]:
    """Bytes one micro-batch of one chunk keeps for backward, by part."""
    d = config.decoder
    h, vocab = d.hidden_size, d.vocab_size // tp
    t, n_img, n_kl = shape.positions, shape.image_positions, shape.kl_positions
    sp = tp if sequence_parallel else 1
    parts: Dict[str, int] = {}
    layer = decoder_layer_bytes(config, shape, tp=tp, recompute=recompute, act_bytes=act_bytes,
                                sequence_parallel=sequence_parallel)
    parts["decoder layers"] = num_layers * layer
    if recompute == "full" and num_layers:
        parts["decoder layers"] += _rope_positions(shape) * (h // d.num_attention_heads) \
            * act_bytes  # the rotary table passed into every checkpoint (one tensor)
    if shape.packed:
        # SDPA's boolean document mask (built once per micro-batch, model/attention.py).
        parts["decoder layers"] += t * t * BOOL
    features = pre_process or post_process
    if features and n_img:
        parts["vision encoder"] = 0 if config.freeze_vision else _vision_bytes(
            config, n_img, tp, act_bytes, recompute_vision)
        # fc1 input (patch features), GELU input, fc2 input.
        parts["adapter"] = n_img * (config.vision.hidden_size + 2 * h // tp) * act_bytes
    if pre_process:
        parts["embedding"] = t * INT64 + n_img * INT64 + (t * (INT64 + BOOL) if tp > 1 else 0)
        if config.pif and n_img and not post_process:
            parts["vm head"] = n_img * (h + vocab) * act_bytes
    if post_process:
        parts["final norm"] = t * (3 * h + 1) * act_bytes // sp
        # fp32 softmax of the MM logits; target mask, masked target ids, supervised mask.
        parts["lm head + loss"] = t * (vocab * FP32 + BOOL + INT64 + BOOL) + FP32
        if n_img:
            parts["vm head"] = n_img * h * act_bytes + (n_img * vocab * act_bytes
                                                        if config.pif and pre_process else 0)
            # Prediction and target rows, 5 fp32 statistics, three index vectors, keep mask.
            parts["visual-word kl"] = n_kl * (2 * vocab * act_bytes + 5 * FP32 + 3 * INT64) \
                + n_img * BOOL
    return parts


def _vision_bytes(config, image_positions: int, tp: int, act_bytes: int,
                  recompute: bool = False) -> int:
    """A trainable ViT: the pixels (the patch convolution's input), CLIP's pre-LayerNorm input,
    and per layer two LayerNorm inputs with their fp32 mean and rstd, the qkv/fc1 inputs, the
    fused qkv output (q, k, v are views of it), the attention output and its fp32 log-sum-exp,
    fc1's output and the GELU's; with ``recompute`` each layer keeps its input only."""
    v = config.vision
    images = image_positions // v.num_patches
    class_tokens = get_encoder_kind(v.kind).num_class_tokens
    tokens = images * (v.num_patches + class_tokens)
    hv, fv = v.hidden_size, v.ffn_hidden_size
    per_layer = (2 * hv + 4 * hv // tp + 2 * fv // tp + 2 * hv) * act_bytes \
        + (4 + v.num_attention_heads // tp) * FP32
    if recompute:
        per_layer = hv * act_bytes
    stem = images * 3 * v.image_size ** 2 * act_bytes
    if class_tokens:  # CLIP's ln_pre
        stem += tokens * (hv * act_bytes + 2 * FP32)
    return stem + v.num_layers_run * tokens * per_layer
