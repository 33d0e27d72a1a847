"""VWLMMModel (megatron-core) vs an independent transformers-based VW-LMM, same weights."""

from __future__ import annotations

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.model import cases


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _parity(pif: bool) -> dict:
    from megatron_vwlmm.convert.hf_configs import llm_hf_config, vision_hf_config
    from megatron_vwlmm.convert.hf_mapping import megatron_to_hf
    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.forward_step import forward_step
    from tests.megatron_vwlmm.reference_vwlmm import ReferenceVWLMM

    config = cases.tiny_config(pif=pif)
    model = build_model(config)
    cases.perturb_(model)
    samples = cases.raw_samples()

    output, loss_func = forward_step(cases.batch(samples, config), model)
    total, metrics = loss_func(output)
    total.backward()

    reference = ReferenceVWLMM(vision_hf_config(config), llm_hf_config(config), pif=pif)
    reference.llm.config._attn_implementation = "eager"
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    hf = megatron_to_hf(state, config)
    reference.llm.load_state_dict(hf["llm"], strict=True)
    missing, unexpected = reference.vision_tower.load_state_dict(hf["vision"], strict=False)
    assert not unexpected
    # Only the unused last layer and post-layernorm may be missing.
    assert all(".layers.2." in k or "post_layernorm" in k for k in missing), missing
    reference.mm_projector.load_state_dict(hf["projector"])
    reference.vm_head.load_state_dict(hf["vm_head"])
    reference.vision_tower.requires_grad_(False)

    images = torch.stack([img for s in samples for img in s["images"]])
    lm_ref, vm_ref, _ = reference(
        [s["input_ids"] for s in samples], [s["labels"] for s in samples], images)
    (lm_ref + vm_ref).backward()

    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    hf_grads = megatron_to_hf(grads, config)
    ref_grads = {
        "projector": {k: p.grad for k, p in reference.mm_projector.named_parameters()},
        "vm_head": {"weight": reference.vm_head.weight.grad},
        "llm": {k: p.grad for k, p in reference.llm.named_parameters()},
    }
    grad_errors = {}
    for component in ("projector", "vm_head"):
        for key, ref_grad in ref_grads[component].items():
            grad_errors[f"{component}.{key}"] = _rel(hf_grads[component][key], ref_grad)
    for key, ref_grad in ref_grads["llm"].items():
        if key.startswith("model.layers.1.") or key == "model.embed_tokens.weight":
            grad_errors[f"llm.{key}"] = _rel(hf_grads["llm"][key], ref_grad)
    vision_grads = [p.grad for p in model.vision_model.parameters()]
    return {
        "lm": (float(metrics["lm_loss"]), float(lm_ref)),
        "vm": (float(metrics["vm_loss"]), float(vm_ref)),
        "grad_errors": grad_errors,
        "vision_grad_is_none": all(g is None for g in vision_grads),
    }


def _switch_grads(**changes) -> dict:
    """Which parameter groups get a gradient under the freeze / vm_target_grad switches."""
    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.forward_step import forward_step

    config = cases.tiny_config(**changes)
    model = build_model(config)
    cases.perturb_(model)
    output, loss_func = forward_step(cases.batch(cases.raw_samples(), config), model)
    loss_func(output)[0].backward()
    groups = {}
    for name, param in model.named_parameters():
        group = name.split(".")[0]
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        groups[group] = groups.get(group, False) or has_grad
    groups["adapter_grad"] = model.adapter.encoder.linear_fc1.weight.grad
    return groups


def _both_modes():
    return {
        "normal": _parity(False),
        "pif": _parity(True),
        "detach": _switch_grads(vm_target_grad="detach"),
        "full": _switch_grads(),
        "frozen": _switch_grads(freeze_decoder=True, freeze_vm_head=True, freeze_vision=True),
    }


@pytest.fixture(scope="module")
def parity():
    return run_on_ranks(_both_modes, 1)[0]


@pytest.mark.parametrize("mode", ["normal", "pif"])
def test_losses_match_reference(parity, mode):
    result = parity[mode]
    for name in ("lm", "vm"):
        ours, ref = result[name]
        assert ref > 0
        assert abs(ours - ref) <= 1e-5 * abs(ref), (mode, name, ours, ref)


@pytest.mark.parametrize("mode", ["normal", "pif"])
def test_gradients_match_reference(parity, mode):
    errors = parity[mode]["grad_errors"]
    assert len(errors) >= 12  # projector (4), vm head, 9 decoder-layer tensors, embeddings
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (mode, worst, errors[worst])


def test_frozen_vision_gets_no_gradient(parity):
    assert parity["normal"]["vision_grad_is_none"]


def test_switches_control_which_parts_learn(parity):
    full, detach, frozen = parity["full"], parity["detach"], parity["frozen"]
    assert full["vm_head"] and full["adapter"] and full["language_model"]
    assert not full["vision_model"]
    # Detached visual-word target: the VM head learns nothing from the KL (its only loss) and
    # the adapter's gradient loses the target path.
    assert not detach["vm_head"] and detach["adapter"]
    assert not torch.allclose(detach["adapter_grad"], full["adapter_grad"])
    # Stage-1 style: only the adapter trains, still through the frozen decoder.
    assert frozen["adapter"] and not frozen["language_model"] and not frozen["vm_head"]
