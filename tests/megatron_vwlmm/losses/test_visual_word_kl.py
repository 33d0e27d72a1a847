"""visual_word_kl against F.kl_div on gathered fp64 logits, unsharded and at TP=2 and TP=4.

Every case builds full-vocabulary logits from a seed, so each rank can cut its own shard and the
parent process can compute the fp64 reference on the whole thing. The loss is weighted by
random per-position weights before backward, which checks that gradients are scaled by the
incoming per-position gradient and not just summed.

Tolerances (eps = fp32 machine epsilon, 1.2e-7). The kernel computes in fp32, and fp32 cannot
hold a KL of magnitude K better than ~eps*K, nor gradients formed from log-probabilities of that
magnitude, so the bound scales with each position's KL:
    values:    |kl - ref|      <= 16 eps (1 + |ref|)
    gradients: |grad - ref|    <= u |ref| + 16 eps |w| (1 + |KL of that row|)
with u = 0 for fp32 gradients and u = 2^-8 (bf16 rounding) when the input, hence its gradient,
is bf16. The reference sees exactly the (possibly bf16-rounded) input values, so bf16 inputs
get the same value tolerance as fp32. Measured worst cases are ~4.4 eps for values and ~1.4 eps
for gradients, so the bounds hold with ~4x margin while a wrong formula, sign or scaling misses
them by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_vwlmm.losses import visual_word_kl
from megatron_vwlmm.parallel.launch import run_on_ranks

EPS32 = torch.finfo(torch.float32).eps
VALUE_TOL = 16 * EPS32
GRAD_TOL = 16 * EPS32
BF16_ROUNDING = 2.0**-8


@dataclass(frozen=True)
class Case:
    """One input distribution: how the full-vocab logits are drawn and how they are chunked."""

    name: str
    positions: int
    vocab: int  # divisible by 4, so every TP size tested holds an equal shard
    mm_dtype: torch.dtype
    vm_dtype: torch.dtype
    kind: str  # "normal", "extreme" (uniform in +-1e4) or "offset" (near-equal, shifted by 1e4)
    chunk_size: Optional[int]


CASES = [
    Case("fp32", 37, 1000, torch.float32, torch.float32, "normal", 5),
    Case("fp32-default-chunk", 37, 1000, torch.float32, torch.float32, "normal", None),
    Case("bf16", 37, 1000, torch.bfloat16, torch.bfloat16, "normal", 8),
    Case("bf16-mm-fp32-vm", 19, 1000, torch.bfloat16, torch.float32, "normal", 4),
    Case("fp32-extreme", 23, 1000, torch.float32, torch.float32, "extreme", 7),
    Case("bf16-extreme", 23, 1000, torch.bfloat16, torch.bfloat16, "extreme", 7),
    Case("fp32-offset-1e4", 23, 1000, torch.float32, torch.float32, "offset", 6),
    Case("one-position", 1, 1000, torch.float32, torch.float32, "normal", 3),
    Case("empty", 0, 1000, torch.float32, torch.float32, "normal", 5),
]


def make_inputs(case: Case, seed: int):
    """Full-vocab (mm_logits, vm_logits, per-position loss weights), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.positions, case.vocab)
    if case.kind == "normal":
        mm, vm = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3
    elif case.kind == "extreme":
        # |x| up to 1e4: softmaxes are nearly one-hot and most probabilities underflow to 0.
        mm = (torch.rand(shape, generator=gen) * 2 - 1) * 1e4
        vm = (torch.rand(shape, generator=gen) * 2 - 1) * 1e4
    elif case.kind == "offset":
        # Close distributions (small KL) carried on huge logits: any x - (m + log S) rounding
        # would show up as an error far above the tolerance.
        base = torch.randn(shape, generator=gen) * 2
        mm = base + 1e4
        vm = base + 0.3 * torch.randn(shape, generator=gen) - 1e4
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    weights = torch.rand(case.positions, generator=gen) + 0.5
    return mm.to(case.mm_dtype), vm.to(case.vm_dtype), weights


def reference(mm: torch.Tensor, vm: torch.Tensor, weights: torch.Tensor):
    """fp64 KL(softmax(vm) || softmax(mm)) per position, and d(sum w*KL)/d(mm, vm).

    ``F.kl_div`` is given the target as log-probabilities (``log_target=True``): the same
    function as ``kl_div(log_softmax(s), softmax(z))``, but its target gradient stays finite
    where a probability underflows to 0 (the probability form's is ``0 * log 0 = NaN`` there).
    """
    mm64 = mm.detach().double().requires_grad_()
    vm64 = vm.detach().double().requires_grad_()
    kl = F.kl_div(
        F.log_softmax(mm64, dim=-1), F.log_softmax(vm64, dim=-1), reduction="none",
        log_target=True,
    ).sum(-1)
    (kl * weights.double()).sum().backward()
    return kl.detach(), mm64.grad, vm64.grad


def run_case(case: Case, mm: torch.Tensor, vm: torch.Tensor, weights, tp_group=None):
    """Forward + weighted backward on (a shard of) the logits; returns (kl, grad_mm, grad_vm)."""
    mm = mm.detach().requires_grad_()
    vm = vm.detach().requires_grad_()
    kl = visual_word_kl(mm, vm, tp_group=tp_group, chunk_size=case.chunk_size)
    (kl * weights).sum().backward()
    return kl.detach(), mm.grad, vm.grad


def assert_matches_reference(case: Case, kl, grad_mm, grad_vm, seed: int) -> None:
    mm, vm, weights = make_inputs(case, seed)
    ref_kl, ref_grad_mm, ref_grad_vm = reference(mm, vm, weights)
    assert kl.dtype == torch.float32 and kl.shape == (case.positions,)
    assert torch.isfinite(kl).all(), f"{case.name}: non-finite KL"
    value_err = (kl.double() - ref_kl).abs()
    value_bound = VALUE_TOL * (1 + ref_kl.abs())
    assert (value_err <= value_bound).all(), (
        f"{case.name}: KL off by {value_err.max().item():.3g} (bound "
        f"{value_bound[value_err.argmax()].item():.3g})"
    )
    row_scale = (GRAD_TOL * weights.double() * (1 + ref_kl.abs()))[:, None]
    for label, grad, ref in (("mm", grad_mm, ref_grad_mm), ("vm", grad_vm, ref_grad_vm)):
        expected_dtype = case.mm_dtype if label == "mm" else case.vm_dtype
        assert grad.dtype == expected_dtype, f"{case.name}: d/d{label} is {grad.dtype}"
        assert grad.shape == ref.shape
        assert torch.isfinite(grad).all(), f"{case.name}: non-finite d/d{label}"
        rounding = BF16_ROUNDING if grad.dtype == torch.bfloat16 else 0.0
        err = (grad.double() - ref).abs()
        bound = rounding * ref.abs() + row_scale
        assert (err <= bound).all(), (
            f"{case.name}: d/d{label} off by {err.max().item():.3g} (bound "
            f"{bound.flatten()[err.argmax()].item():.3g})"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unsharded_matches_fp64_kl_div(case):
    mm, vm, weights = make_inputs(case, seed=0)
    assert_matches_reference(case, *run_case(case, mm, vm, weights), seed=0)


def _sharded_cases(seed: int):
    """Rank body (world size 4): every case at TP=4 and at TP=2, on this rank's vocab shards.

    TP=4 goes through the default ``tp_group=None`` (megatron's TP group); TP=2 passes explicit
    groups {0, 1} and {2, 3}. One launch covers both, since starting ranks costs far more than
    the checks themselves.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == dist.get_world_size() == 4
    rank = dist.get_rank()
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    layouts = {
        4: (None, parallel_state.get_tensor_model_parallel_rank()),
        2: (pair_groups[rank // 2], rank % 2),
    }
    results = {}
    for tp, (group, tp_rank) in layouts.items():
        for case in CASES:
            mm, vm, weights = make_inputs(case, seed)
            shard = slice(tp_rank * case.vocab // tp, (tp_rank + 1) * case.vocab // tp)
            results[tp, case.name] = run_case(case, mm[:, shard], vm[:, shard], weights, group)
    return results


SHARDED_SEED = 104


@pytest.fixture(scope="module")
def sharded_results():
    """Per-rank results of one 4-rank launch, shared by the TP=2 and TP=4 checks."""
    return run_on_ranks(_sharded_cases, 4, tp=4, args=(SHARDED_SEED,), timeout_s=300)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_fp64_kl_div_and_agrees_across_ranks(sharded_results, tp):
    for case in CASES:
        # Ranks r*tp .. r*tp+tp-1 form one TP group (at TP=2 there are two such groups).
        for first in range(0, len(sharded_results), tp):
            group_results = [sharded_results[r][tp, case.name] for r in range(first, first + tp)]
            kls = [kl for kl, _, _ in group_results]
            for offset, kl in enumerate(kls[1:], start=1):
                assert torch.equal(kl, kls[0]), (
                    f"TP={tp} {case.name}: rank {first + offset} KL differs from rank {first}"
                )
            grad_mm = torch.cat([grad for _, grad, _ in group_results], dim=1)
            grad_vm = torch.cat([grad for _, _, grad in group_results], dim=1)
            assert_matches_reference(case, kls[0], grad_mm, grad_vm, SHARDED_SEED)


def test_detached_target_gets_no_gradient_and_prediction_gradient_is_unchanged():
    case = CASES[0]
    mm, vm, weights = make_inputs(case, seed=3)
    _, ref_grad_mm, _ = reference(mm, vm, weights)
    mm = mm.requires_grad_()
    kl = visual_word_kl(mm, vm.detach(), chunk_size=case.chunk_size)
    (kl * weights).sum().backward()
    assert vm.grad is None
    assert torch.allclose(mm.grad.double(), ref_grad_mm, rtol=0, atol=1e-6)


def test_extra_memory_is_bounded_by_the_chunk_not_by_positions():
    positions, vocab, chunk = 512, 4096, 16
    gen = torch.Generator().manual_seed(5)
    mm = torch.randn(positions, vocab, generator=gen, requires_grad=True)
    vm = torch.randn(positions, vocab, generator=gen, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        visual_word_kl(mm, vm, chunk_size=chunk).sum().backward()
    live = peak = 0
    for event in sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    ):
        live += event.nbytes()
        peak = max(peak, live)
    chunk_buffer = chunk * vocab * 4
    gradients = 2 * positions * vocab * 4  # unavoidable: d/dmm and d/dvm themselves
    # Four fp32 chunk buffers at a time (module docstring), plus [5, N]-sized statistics. A
    # kernel that materialised even one fp32 [N, V] temporary would exceed this by 3x.
    assert peak <= gradients + 5 * chunk_buffer + 64 * positions * 4, (
        f"peak extra memory {peak / 2**20:.1f} MiB for gradients of {gradients / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize(
    "mm_shape, vm_shape, chunk_size, error, match",
    [
        ((4, 8), (4, 6), None, ValueError, "same positions"),
        ((4, 8, 2), (4, 8, 2), None, ValueError, "mm_logits must be"),
        ((4, 0), (4, 0), None, ValueError, "empty vocab shard"),
        ((4, 8), (4, 8), 0, ValueError, "chunk_size"),
        ((4, 8), (4, 8), 2.5, ValueError, "chunk_size"),
    ],
)
def test_bad_input_names_the_problem(mm_shape, vm_shape, chunk_size, error, match):
    with pytest.raises(error, match=match):
        visual_word_kl(torch.zeros(mm_shape), torch.zeros(vm_shape), chunk_size=chunk_size)


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match="vm_logits must be a float tensor"):
        visual_word_kl(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
