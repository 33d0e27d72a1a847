"""Sequence packing: the packed micro-batch gives each sample the same LM and VM loss sums and the
model the same gradients as the same samples padded one per row, in normal and PIF modes, at
TP=1, TP=2, PP=2, TP=2 x PP=2 and PP=4 (megatron's real schedules; at PP=4 the two middle stages
get only the packed layout); plus the pure packing functions."""

from __future__ import annotations

import pytest
import torch

from megatron_vwlmm.model.packing import (document_ids, document_positions, next_token_targets,
                                          pack_rows)
from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.model import cases

LAYOUTS = {"tp1pp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2), "pp4": (1, 4)}
MODES = {"normal": False, "pif": True}
ROWS = 3  # rows per packed micro-batch


# --- pure functions ---------------------------------------------------------------------------


def test_pack_rows_first_fit_decreasing_is_deterministic():
    lengths = [37, 10, 25, 23, 37, 10, 25, 23]
    rows = pack_rows(lengths, 96)
    assert rows == [[0, 1, 4, 5], [2, 3, 6, 7]]  # 37+37+10+10 = 94, 25+25+23+23 = 96
    assert pack_rows(lengths, 96) == rows
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 96 for r in rows)
    assert pack_rows([5, 5, 5], 5) == [[0], [1], [2]]


def test_pack_rows_refuses_a_sample_longer_than_a_row_by_name():
    with pytest.raises(ValueError, match="sample cat-17: 97 positions .* row length .* 96"):
        pack_rows([10, 97], 96, names=["dog-3", "cat-17"])


def test_document_positions_and_targets_stay_inside_documents():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert document_ids(cu).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert document_positions(cu).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    labels = torch.arange(10, 19)[None]
    targets = next_token_targets(labels, cu)
    # Shifted left; the last position of each document predicts nothing.
    assert targets.tolist() == [[11, 12, -100, 14, -100, 16, 17, 18, -100]]
    unpacked = next_token_targets(labels)
    assert unpacked.tolist() == [[11, 12, 13, 14, 15, 16, 17, 18, -100]]


def test_collate_packed_layout():
    from megatron_vwlmm.model import collate_packed

    config = cases.tiny_config()
    samples = _samples()
    batches, members = collate_packed(samples, seq_length=cases.SEQ, rows_per_micro_batch=ROWS,
                                      num_patches=config.num_patches, pad_token_id=0)
    assert len(batches) == 1 and sorted(members[0]) == list(range(len(samples)))
    b = batches[0]
    assert b.tokens.shape == (1, ROWS * cases.SEQ)
    lengths = b.sample_lengths.tolist()
    # Rows of 95 (+ a 1-position padding document), exactly 96, and 20 (+ 76 of padding).
    assert b.cu_seqlens.tolist()[-1] == ROWS * cases.SEQ
    assert len(b.cu_seqlens) == len(samples) + 2 + 1
    assert b.num_useful_positions == sum(lengths) == ROWS * cases.SEQ - 77
    assert b.num_images == sum(len(samples[i]["images"]) for i in members[0])
    # The images follow the mask's image runs: sample by sample in packed order.
    expected = torch.stack([img for i in members[0] for img in samples[i]["images"]])
    assert torch.equal(b.images, expected)
    unpacked = cases.batch(samples, config)
    assert b.num_lm_tokens == unpacked.num_lm_tokens
    assert b.num_vm_positions == unpacked.num_vm_positions


# --- the model: packed == unpacked -----------------------------------------------------------


def _samples():
    """Nine samples (0, 1 and 2 images, after BOS, in the middle, and one sample that *starts*
    with its image, whose first patch has no predecessor) of 10-37 positions: three rows of 96
    when packed (95, exactly 96, and 20 positions)."""
    g = torch.Generator().manual_seed(7)
    text = torch.randint(3, cases.VOCAB, (5,), generator=g).tolist()
    image_first = {"input_ids": [-200] + text, "labels": [-100] + text,
                   "images": [torch.randn(3, 32, 32, generator=g)]}
    return cases.raw_samples(0) + cases.raw_samples(1) + [image_first]


def _documents(sample_lengths, seq_length: int, rows: int):
    """The packed micro-batch's documents, in order: the sample index, or None for padding
    (each row's samples, then its free tail; empty rows are one padding document)."""
    packed = pack_rows(sample_lengths, seq_length)
    packed += [[] for _ in range(rows - len(packed))]
    docs = []
    for row in packed:
        docs += row
        if sum(sample_lengths[i] for i in row) < seq_length:
            docs.append(None)
    return docs


def _per_sample_sums(captured, batch, docs):
    """Per-sample (lm_sum, vm_sum) from the per-position losses the model computed."""
    lm_loss, _, vm_loss, _ = captured
    if batch.packing is None:
        return {b: (float(lm_loss[b].sum()), float(vm_loss[b].sum()))
                for b in range(lm_loss.shape[0])}
    out = {}
    bounds = batch.cu_seqlens.tolist()
    assert len(bounds) == len(docs) + 1
    for d, sample in enumerate(docs):
        s, e = bounds[d], bounds[d + 1]
        if sample is None:
            assert float(lm_loss[0, s:e].abs().sum()) == 0 and float(vm_loss[0, s:e].sum()) == 0
            continue
        out[sample] = (float(lm_loss[0, s:e].sum()), float(vm_loss[0, s:e].sum()))
    return out


def _run(model, batch, shape):
    """One forward/backward through megatron's schedule with sum-normalised losses; returns
    the per-position losses of the last stage (or None) and this rank's gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vwlmm.model.forward_step import TokenTotals, forward_step

    captured = {}
    original = model._position_losses

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["losses"] = tuple(t.detach().clone() for t in out)
        return out

    model._position_losses = capture
    model.zero_grad(set_to_none=True)
    from megatron.core import parallel_state as ps

    middle = not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage())
    item = batch.packing if middle else batch  # middle stages: the layout only
    get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(next(it), m, TokenTotals(1, 1)),
        data_iterator=iter([item]), model=[model], num_microbatches=1,
        seq_length=shape[0], micro_batch_size=shape[1], forward_only=False)
    model._position_losses = original
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return captured.get("losses"), grads


def _compare_layout(layout: str) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.model import build_model, collate_packed
    from megatron_vwlmm.model.config import RuntimeOptions

    results = {}
    for mode, pif in MODES.items():
        config = cases.tiny_config(pif=pif)
        model = build_model(config, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(),
                            runtime=RuntimeOptions(calculate_per_token_loss=True))
        cases.perturb_(model)
        samples = _samples()
        unpacked = cases.batch(samples, config)
        packed, _ = collate_packed(samples, seq_length=cases.SEQ, rows_per_micro_batch=ROWS,
                                   num_patches=config.num_patches, pad_token_id=0)
        ref_losses, ref_grads = _run(model, unpacked, (cases.SEQ, len(samples)))
        pk_losses, pk_grads = _run(model, packed[0], (ROWS * cases.SEQ, 1))
        assert ref_grads.keys() == pk_grads.keys() and len(ref_grads) > 0
        grad_err = max(float((pk_grads[n] - g).norm() / g.norm().clamp(min=1e-30))
                       for n, g in ref_grads.items() if g.abs().sum() > 0)
        entry = {"grad_rel": grad_err, "num_grads": len(ref_grads)}
        if ref_losses is not None:
            docs = _documents(unpacked.sample_lengths.tolist(), cases.SEQ, ROWS)
            entry["unpacked"] = _per_sample_sums(ref_losses, unpacked, None)
            entry["packed"] = _per_sample_sums(pk_losses, packed[0], docs)
        results[mode] = entry
    return results


def _all_layouts() -> dict:
    from tests.megatron_vwlmm.model.test_layout_equivalence import _use_layout

    out = {}
    for layout, (tp, pp) in LAYOUTS.items():
        _use_layout(tp, pp)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, _compare_layout(layout))
        out[layout] = gathered
    return out


@pytest.fixture(scope="module")
def compared():
    return run_on_ranks(_all_layouts, 4, timeout_s=900)[0]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_unpacked(compared, layout, mode):
    ranks = [r[mode] for r in compared[layout]]
    with_losses = [r for r in ranks if "packed" in r]
    assert with_losses, "no last-stage rank reported losses"
    for r in with_losses:
        assert sorted(r["packed"]) == sorted(r["unpacked"]) == list(range(9))
        for sample, (lm, vm) in r["unpacked"].items():
            p_lm, p_vm = r["packed"][sample]
            assert p_lm == pytest.approx(lm, rel=1e-5, abs=1e-6), (sample, "lm")
            assert p_vm == pytest.approx(vm, rel=1e-5, abs=1e-7), (sample, "vm")
        assert sum(vm for _, vm in r["unpacked"].values()) > 0  # images were supervised
    for r in ranks:
        assert r["grad_rel"] <= 1e-4, r["grad_rel"]
        assert r["num_grads"] >= 5  # a PP=4 middle stage holds one decoder layer
