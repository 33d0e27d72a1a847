"""``model/memory.py`` against the real model: the activation bytes it predicts for one
micro-batch are within 10% of the bytes autograd actually keeps for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters excluded), for the
tiny preset and an 8-layer h=512 model, padded and packed, without recompute, with selective
and with full recompute, and for a trainable vision tower with and without its own recompute. One single-rank launch measures
every case; one two-rank launch measures the 8-layer model at TP=2 with and without sequence
parallelism, whose saving (the norms' and the linears' inputs, the checkpointed layer inputs:
``1/tp`` of them kept) shows up in the measured bytes as predicted.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from megatron_vwlmm.model.config import RuntimeOptions, get_preset
from megatron_vwlmm.model.memory import MicroBatchShape, activation_bytes, chunk_parameters
from megatron_vwlmm.parallel.launch import run_on_ranks

SEQ = 128
SMALL = {"decoder.num_layers": 8, "decoder.hidden_size": 512, "decoder.ffn_hidden_size": 1376,
         "decoder.num_attention_heads": 8, "decoder.num_query_groups": 4,
         "decoder.seq_length": SEQ}
# A trainable vision tower wide enough to matter next to the heads.
VISION = {"decoder.seq_length": SEQ, "freeze_vision": False, "vision.hidden_size": 256,
          "vision.ffn_hidden_size": 1024}
MODELS = {"tiny": {"decoder.seq_length": SEQ}, "small": SMALL, "trainable-vision": VISION}
CASES = [(model, packed, recompute) for model in ("tiny", "small") for packed in (False, True)
         for recompute in (None, "selective", "full")]
# "vision": the trainable tower's own recompute (parallel.recompute_vision), decoder without.
CASES += [("trainable-vision", packed, recompute) for packed in (False, True)
          for recompute in (None, "vision")]


def _samples(config):
    """Two samples of one image and 40 text tokens each, two of three images and 20."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for images, text in ((1, 40), (1, 40), (3, 20), (3, 20)):
        ids = [1] + [-200] * images + list(range(5, 5 + text))
        samples.append({"input_ids": ids, "labels": [-100 if t in (1, -200) else t for t in ids],
                        "images": [torch.randn(3, config.vision.image_size,
                                               config.vision.image_size, generator=g)
                                   for _ in range(images)]})
    return samples


def _batch(config, packed):
    from megatron_vwlmm.model import collate_packed, collate_samples

    samples = _samples(config)
    if packed:
        batches, _ = collate_packed(samples, seq_length=SEQ, rows_per_micro_batch=2,
                                    num_patches=config.num_patches, pad_token_id=0)
        assert len(batches) == 1
        return batches[0]
    return collate_samples(samples, seq_length=SEQ, num_patches=config.num_patches,
                           pad_token_id=0)


def _shape(batch):
    return MicroBatchShape(
        rows=batch.tokens.shape[0] if batch.packing is None else batch.tokens.shape[1] // SEQ,
        seq_length=SEQ, image_positions=int(batch.image_token_mask.sum()),
        kl_positions=batch.num_vm_positions, packed=batch.packing is not None)


def _measure(cases):
    """Bytes saved for backward by one forward of each case's whole model (PP = 1) on this
    rank; a case is (model, packed, recompute) or (model, packed, recompute, sequence
    parallel)."""
    from megatron_vwlmm.model import build_model

    measured = []
    # megatron's checkpoint saves the CUDA RNG state; forward-only on the CPU it needs a value.
    with mock.patch("torch.cuda.random.get_rng_state", lambda *a, **k: torch.get_rng_state()):
        for model, packed, recompute, *sp in cases:
            config = get_preset("tiny", **MODELS[model])
            runtime = RuntimeOptions(
                recompute_granularity=None if recompute == "vision" else recompute,
                recompute_method="uniform" if recompute == "full" else None,
                sequence_parallel=bool(sp and sp[0]), recompute_vision=recompute == "vision")
            net = build_model(config, runtime=runtime)
            params = {p.untyped_storage().data_ptr() for p in net.parameters()}
            batch = _batch(config, packed)
            storages = {}

            def pack(tensor):
                ptr = tensor.untyped_storage().data_ptr()
                if ptr not in params:
                    storages[ptr] = tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = net(batch.tokens, batch.image_token_mask, batch.images,
                          labels=batch.labels, packing=batch.packing)
            measured.append((sum(storages.values()), _shape(batch)))
            del out, net
    return measured


@pytest.fixture(scope="module")
def measured():
    return dict(zip(CASES, run_on_ranks(_measure, 1, args=(CASES,), timeout_s=900)[0]))


@pytest.mark.parametrize("model, packed, recompute", CASES,
                         ids=[f"{m}-{'packed' if p else 'padded'}-{r or 'none'}"
                              for m, p, r in CASES])
def test_activation_bytes_within_10_percent_of_saved_tensors(measured, model, packed,
                                                              recompute):
    actual, shape = measured[(model, packed, recompute)]
    config = get_preset("tiny", **MODELS[model])
    predicted = sum(activation_bytes(config, shape, tp=1, num_layers=config.decoder.num_layers,
                                     pre_process=True, post_process=True,
                                     recompute=None if recompute == "vision" else recompute,
                                     act_bytes=4, recompute_vision=recompute == "vision").values())
    print(f"{model} {'packed' if packed else 'padded'} {recompute}: predicted {predicted} "
          f"measured {actual} ({predicted / actual - 1:+.2%})")
    assert abs(predicted / actual - 1) <= 0.10


SP_CASES = [("small", packed, recompute, sp) for packed in (False, True)
            for recompute in (None, "full") for sp in (False, True)]


@pytest.fixture(scope="module")
def measured_tp2():
    return dict(zip(SP_CASES, run_on_ranks(_measure, 2, tp=2, args=(SP_CASES,),
                                           timeout_s=900)[0]))


def _predicted_tp2(case, shape):
    model, _, recompute, sp = case
    config = get_preset("tiny", **MODELS[model])
    return sum(activation_bytes(config, shape, tp=2, num_layers=config.decoder.num_layers,
                                pre_process=True, post_process=True, recompute=recompute,
                                act_bytes=4, sequence_parallel=sp).values())


@pytest.mark.parametrize("case", SP_CASES, ids=[
    f"{'packed' if p else 'padded'}-{r or 'none'}-{'sp' if sp else 'no-sp'}"
    for _, p, r, sp in SP_CASES])
def test_tp2_activation_bytes_within_10_percent_with_and_without_sp(measured_tp2, case):
    actual, shape = measured_tp2[case]
    predicted = _predicted_tp2(case, shape)
    print(f"TP=2 {case}: predicted {predicted} measured {actual} ({predicted / actual - 1:+.2%})")
    assert abs(predicted / actual - 1) <= 0.10


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("recompute", [None, "full"], ids=["none", "full"])
def test_sequence_parallel_saving_is_measured_as_predicted(measured_tp2, packed, recompute):
    """What SP saves per rank: measured (SP off - SP on) within 10% of the predicted saving,
    and a real share of the layer activations (not a rounding effect)."""
    (off, shape), (on, _) = (measured_tp2[("small", packed, recompute, sp)]
                             for sp in (False, True))
    predicted = (_predicted_tp2(("small", packed, recompute, False), shape)
                 - _predicted_tp2(("small", packed, recompute, True), shape))
    print(f"SP saving {'packed' if packed else 'padded'} {recompute}: predicted {predicted} "
          f"measured {off - on} of {off}")
    assert off - on >= 0.05 * off
    assert abs((off - on) / predicted - 1) <= 0.10


def test_vision_recompute_saves_the_predicted_tower_bytes(measured):
    """The trainable tower's own recompute is measured, not only predicted: it must save most
    of what the tower keeps (the decoder and heads are the same in both cases)."""
    for packed in (False, True):
        (without, _), (with_recompute, _) = (measured[("trainable-vision", packed, r)]
                                             for r in (None, "vision"))
        config = get_preset("tiny", **VISION)
        shape = measured[("trainable-vision", packed, None)][1]
        tower = sum(activation_bytes(config, shape, tp=1, num_layers=config.decoder.num_layers,
                                     pre_process=True, post_process=True,
                                     act_bytes=4).values()) - sum(activation_bytes(
            config, shape, tp=1, num_layers=config.decoder.num_layers, pre_process=True,
            post_process=True, act_bytes=4, recompute_vision=True).values())
        assert without - with_recompute == pytest.approx(tower, rel=0.10)


def test_chunk_parameters_list_the_model_in_order():
    """Names, order and sizes of a whole single-stage model (the multi-rank sizes are checked
    through the planner in ``tests/pipeline/test_plan.py``)."""
    results = run_on_ranks(_named_parameters, 1, timeout_s=600)[0]
    for pif, names in results:
        config = get_preset("tiny", pif=pif)
        predicted = [(p.name, p.numel, p.trainable) for p in chunk_parameters(
            config, tp=1, pp=1, pre_process=True, post_process=True,
            num_layers=config.decoder.num_layers)]
        assert predicted == names


def _named_parameters():
    from megatron_vwlmm.model import build_model

    out = []
    for pif in (False, True):
        net = build_model(get_preset("tiny", pif=pif))
        out.append((pif, [(n, p.numel(), p.requires_grad) for n, p in net.named_parameters()]))
    return out
