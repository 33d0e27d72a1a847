"""SDPAttention (``model/attention.py``) against megatron's unfused ``DotProductAttention``.

Every check runs in one 2-rank launch: first at TP=1 (both ranks compute the same, as DP
replicas) -- the core module alone (causal / no mask, GQA, query-key layer scaling, an explicit
softmax scale, dropout through megatron's RNG fork), packed documents against each document on
its own, the FlexAttention mask against the boolean one, the whole VW-LMM with each backend,
a packed GPTModel against its documents; then at TP=2, whole ``SelfAttention`` layers built from
each layer spec with the same weights. fp32 throughout, relative tolerance 1e-5.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.model import cases

TOL = 1e-5
# Document lengths of the packed checks: length-1 documents and a tail padding document.
DOC_LENGTHS = (5, 1, 7, 1, 9, 3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _transformer_config(**changes):
    """The tiny decoder's TransformerConfig (4 heads, 2 groups) with megatron fields changed."""
    import dataclasses

    from megatron_vwlmm.model.config import decoder_transformer_config

    return dataclasses.replace(decoder_transformer_config(cases.tiny_config()), **changes)


def _cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _packed_params(lengths):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = _cu_seqlens(lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def _run(module, q, k, v, weight, **kwargs):
    """Output and the gradients of a fixed random projection of it w.r.t. q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = module(q, k, v, None, **kwargs)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in (q, k, v)]


def _compare(out, grads, ref_out, ref_grads) -> float:
    return max([_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)])


# -- TP=1: the core module ---------------------------------------------------------------------

def _core_checks() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_vwlmm.model.attention import SDPAttention

    g = torch.Generator().manual_seed(0)
    errors = {}
    variants = {
        "plain": ({}, {}, 1),
        "layer_scaling": ({"apply_query_key_layer_scaling": True}, {}, 3),
        "softmax_scale": ({}, {"softmax_scale": 0.37}, 1),
    }
    for mask_type in (AttnMaskType.causal, AttnMaskType.no_mask):
        for name, (config_changes, kwargs, layer) in variants.items():
            config = _transformer_config(**config_changes)
            args = dict(config=config, layer_number=layer, attn_mask_type=mask_type,
                        attention_type="self", **kwargs)
            s, b = 12, 2
            q = torch.randn(s, b, 4, 16, generator=g)
            k, v = (torch.randn(s, b, 2, 16, generator=g) for _ in range(2))
            weight = torch.randn(s, b, 64, generator=g)
            ours = _run(SDPAttention(**args), q, k, v, weight)
            ref = _run(DotProductAttention(**args), q, k, v, weight)
            errors[f"{mask_type.name}/{name}"] = _compare(*ours, *ref)
    return errors


def _dropout_checks() -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_vwlmm.model.attention import SDPAttention

    module = SDPAttention(_transformer_config(attention_dropout=0.5), 1, AttnMaskType.causal,
                          "self")
    q, k, v = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    default_state, tracker_states = torch.get_rng_state(), tracker.get_states()
    first = module(q, k, v, None)
    default_untouched = torch.equal(torch.get_rng_state(), default_state)
    tracker.set_states(tracker_states)
    again = module(q, k, v, None)
    module.eval()
    return {"default_rng_untouched": default_untouched, "repeatable": torch.equal(first, again),
            "drops": not torch.allclose(first, module(q, k, v, None))}


# -- TP=1: packed documents ----------------------------------------------------------------------

def _packed_checks() -> dict:
    """Packed (thd) == each document through megatron's unpacked causal attention; the Flex
    mask == the boolean mask; a cu_seqlens changed in place is not served from the cache."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention.flex_attention import create_mask

    from megatron_vwlmm.model.attention import (
        SDPAttention,
        document_causal_mask,
        document_causal_mask_mod,
    )
    from megatron_vwlmm.model.packing import document_ids

    g = torch.Generator().manual_seed(1)
    args = dict(config=_transformer_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    t = sum(DOC_LENGTHS)
    q = torch.randn(t, 4, 16, generator=g)
    k, v = (torch.randn(t, 2, 16, generator=g) for _ in range(2))
    weight = torch.randn(t, 64, generator=g)
    params = _packed_params(DOC_LENGTHS)
    ours = _run(SDPAttention(**args), q, k, v, weight, packed_seq_params=params)

    reference = DotProductAttention(**args)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    outs, start = [], 0
    for n in DOC_LENGTHS:
        doc = [x[start:start + n].unsqueeze(1) for x in leaves]  # [n, 1, heads, hn]
        outs.append(reference(*doc, None).squeeze(1))
        start += n
    ref_out = torch.cat(outs)
    (ref_out * weight).sum().backward()
    result = {"packed_vs_documents": _compare(*ours, ref_out.detach(), [x.grad for x in leaves])}

    # The cache is keyed by the tensor object and its version: an in-place edit rebuilds.
    sdpa = SDPAttention(**args)
    merged = [DOC_LENGTHS[0] + DOC_LENGTHS[1], *DOC_LENGTHS[2:]]
    tail = torch.tensor([t], dtype=torch.int32)  # same length as before: an empty document
    params.cu_seqlens_q.copy_(torch.cat([_cu_seqlens(merged), tail]))
    edited = sdpa(q, k, v, None, packed_seq_params=params)
    fresh = sdpa(q, k, v, None, packed_seq_params=_packed_params(merged))
    result["cache_sees_inplace_edit"] = _rel(edited, fresh)

    # FlexAttention: its mask_mod against the boolean mask, and its (forward-only on CPU)
    # kernel against the SDPA path.
    ids = document_ids(_cu_seqlens(DOC_LENGTHS), t)
    flex_mask = create_mask(document_causal_mask_mod(ids), None, None, t, t, device="cpu")
    result["flex_mask_equal"] = torch.equal(flex_mask[0, 0], document_causal_mask(ids))
    flex = SDPAttention(**args, packed_kernel="flex")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention recommends torch.compile
        result["flex_vs_sdpa"] = _rel(flex(q, k, v, None, packed_seq_params=params),
                                      sdpa(q, k, v, None, packed_seq_params=params))
    return result


def _packed_gpt_checks() -> dict:
    """A GPTModel (SDPA layers, RoPE) fed one packed row == fed each document on its own:
    logits and parameter gradients (megatron's local path restarts RoPE per document)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_vwlmm.model.specs import decoder_layer_spec

    config = _transformer_config(num_layers=2)
    model = GPTModel(config=config, transformer_layer_spec=decoder_layer_spec("local", "sdpa"),
                     vocab_size=cases.VOCAB, max_sequence_length=64,
                     position_embedding_type="rope")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cases.VOCAB, (1, sum(DOC_LENGTHS)), generator=g)
    weight = torch.randn(1, sum(DOC_LENGTHS), cases.VOCAB, generator=g)

    def step(fn):
        model.zero_grad()
        logits = fn()
        (logits * weight).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = step(lambda: model(tokens, None, None, packed_seq_params=_packed_params(DOC_LENGTHS)))

    def per_document():
        bounds = _cu_seqlens(DOC_LENGTHS).tolist()
        return torch.cat([model(tokens[:, a:b], None, None) for a, b in zip(bounds, bounds[1:])],
                         dim=1)

    docs = step(per_document)
    errors = {"logits": _rel(packed[0], docs[0])}
    errors.update({n: _rel(packed[1][n], docs[1][n]) for n in docs[1]})
    return errors


# -- TP=1: the whole model -------------------------------------------------------------------------

def _model_backend_checks() -> dict:
    """VW-LMM (decoder causal + CLIP ViT no-mask layers) with SDPA == with the unfused
    attention: losses, all gradients (vision unfrozen), and the same checkpoint keys."""
    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.attention import SDPAttention
    from megatron_vwlmm.model.forward_step import forward_step

    runs = {}
    for backend in ("sdpa", "unfused"):
        config = cases.tiny_config(attention_backend=backend, freeze_vision=False)
        model = build_model(config)
        if backend == "sdpa":
            cases.perturb_(model)
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        output, loss_func = forward_step(cases.batch(cases.raw_samples(), config), model)
        total, metrics = loss_func(output)
        total.backward()
        runs[backend] = {
            "loss": total.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "keys": sorted(model.state_dict()),
            "sharded_keys": sorted(model.sharded_state_dict()),
            "sdpa_modules": sum(isinstance(m, SDPAttention) for m in model.modules()),
        }
    sdpa, unfused = runs["sdpa"], runs["unfused"]
    grad_errors = {n: _rel(sdpa["grads"][n], g) for n, g in unfused["grads"].items()}
    return {
        "loss": _rel(sdpa["loss"], unfused["loss"]),
        "grad_errors": grad_errors,
        "same_grad_names": sorted(sdpa["grads"]) == sorted(unfused["grads"]),
        "same_keys": sdpa["keys"] == unfused["keys"],
        "same_sharded_keys": sdpa["sharded_keys"] == unfused["sharded_keys"],
        "sdpa_modules": (sdpa["sdpa_modules"], unfused["sdpa_modules"]),
    }


# -- TP=2: SelfAttention layers from each spec ---------------------------------------------------

def _tp2_checks() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vwlmm.model.specs import decoder_layer_spec, vision_layer_spec
    from megatron_vwlmm.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    set_seed(1234)
    # 8 heads in 4 groups: each rank holds 4 heads in 2 groups, so GQA grouping is exercised.
    config = _transformer_config(num_attention_heads=8, num_query_groups=4, kv_channels=8,
                                 tensor_model_parallel_size=2)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 2, 64, generator=g)
    weight = torch.randn(10, 2, 64, generator=g)
    errors = {}
    for name, spec_fn in (("decoder_causal", decoder_layer_spec), ("vision_no_mask",
                                                                     vision_layer_spec)):
        results = {}
        for backend in ("sdpa", "unfused"):
            attention = build_module(spec_fn("local", backend).submodules.self_attention,
                                     config=config, layer_number=1)
            if backend == "sdpa":
                state = attention.state_dict()
            else:
                attention.load_state_dict(state)
            x = hidden.clone().requires_grad_(True)
            out, _ = attention(x, None)
            (out * weight).sum().backward()
            grads = [x.grad] + [p.grad for _, p in sorted(attention.named_parameters())]
            results[backend] = (out.detach(), grads)
        errors[name] = _compare(results["sdpa"][0], results["sdpa"][1],
                                results["unfused"][0], results["unfused"][1])
        errors[f"{name}/heads_per_rank"] = (attention.num_attention_heads_per_partition,
                                            attention.num_query_groups_per_partition)
    return errors


def _all_checks() -> dict:
    return {
        "core": _core_checks(),
        "dropout": _dropout_checks(),
        "packed": _packed_checks(),
        "packed_gpt": _packed_gpt_checks(),
        "model": _model_backend_checks(),
        "tp2": _tp2_checks(),
    }


@pytest.fixture(scope="module")
def checks():
    results = run_on_ranks(_all_checks, 2)
    return results[0]


def test_matches_dot_product_attention(checks):
    errors = checks["core"]
    assert len(errors) == 6
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors)


def test_dropout_uses_megatrons_rng_fork(checks):
    assert checks["dropout"] == {"default_rng_untouched": True, "repeatable": True,
                                 "drops": True}


def test_packed_documents_do_not_see_each_other(checks):
    packed = checks["packed"]
    assert packed["packed_vs_documents"] <= TOL, packed
    assert packed["cache_sees_inplace_edit"] <= TOL, packed
    assert packed["flex_mask_equal"], packed
    assert packed["flex_vs_sdpa"] <= TOL, packed


def test_packed_gpt_model_equals_documents_alone(checks):
    errors = checks["packed_gpt"]
    assert len(errors) > 10
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors[worst])


def test_model_with_sdpa_equals_unfused(checks):
    model = checks["model"]
    # decoder (4 layers) + the ViT layers that run (2): SDPA in all of them, or in none.
    assert model["sdpa_modules"] == (6, 0)
    assert model["same_keys"] and model["same_sharded_keys"] and model["same_grad_names"]
    assert model["loss"] <= TOL, model["loss"]
    assert len(model["grad_errors"]) > 40
    worst = max(model["grad_errors"], key=model["grad_errors"].get)
    assert model["grad_errors"][worst] <= TOL, (worst, model["grad_errors"][worst])


def test_tp2_self_attention_layers_match(checks):
    tp2 = checks["tp2"]
    assert tp2["decoder_causal/heads_per_rank"] == tp2["vision_no_mask/heads_per_rank"] == (4, 2)
    assert tp2["decoder_causal"] <= TOL and tp2["vision_no_mask"] <= TOL, tp2


def test_bad_attention_backend_names_the_field():
    from megatron_vwlmm.model.config import replace

    with pytest.raises(ValueError, match="attention_backend: 'flash' is not one of"):
        replace(cases.tiny_config(), attention_backend="flash")


def test_config_round_trips_and_old_configs_load():
    from megatron_vwlmm.checkpoint.metadata import config_from_dict, config_to_dict

    config = cases.tiny_config(attention_backend="unfused")
    assert config_from_dict(config_to_dict(config)) == config
    old = config_to_dict(cases.tiny_config())
    del old["attention_backend"]
    assert config_from_dict(old).attention_backend == "auto"
