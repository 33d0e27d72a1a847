"""TP=2, PP=2 and TP=2 x PP=2, with and without sequence parallelism, reproduce TP=1 x PP=1:
losses and gradients, normal and PIF, padded and packed micro-batches.

One saved state (a dist checkpoint) is loaded into every layout, since the same seed does not
give the same weights across PP sizes. Each layout runs megatron's real schedule (1F1B when
PP > 1) over two micro-batches, sums the stage-replica gradients like the trainer does, and
saves its gradients *as a checkpoint* in its own layout; one TP1PP1 process then loads every
gradient checkpoint back, so megatron's own resharding assembles the full gradients. All of it
runs in one 4-rank launch that rebuilds megatron's groups per layout (spare ranks are DP
replicas).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.model import cases

LAYOUTS = {  # name -> (TP, PP, sequence parallel)
    "tp1pp1": (1, 1, False), "tp2": (2, 1, False), "pp2": (1, 2, False),
    "tp2pp2": (2, 2, False), "tp2_sp": (2, 1, True), "tp2pp2_sp": (2, 2, True)}
MODES = {  # name -> (PIF, packed micro-batches)
    "normal": (False, False), "pif": (True, False), "packed": (False, True),
    "packed_pif": (True, True)}
CANDIDATES = [layout for layout in LAYOUTS if layout != "tp1pp1"]
# Packed micro-batches at the layouts sequence parallelism changes (and the reference): the
# other layouts' packed path is the trainer's (tests/pipeline/test_train_packing.py).
PACKED_LAYOUTS = ("tp1pp1", "tp2_sp", "tp2pp2_sp")


def _modes(layout: str):
    return {mode: value for mode, value in MODES.items()
            if not value[1] or layout in PACKED_LAYOUTS}


CASES = [(layout, mode) for layout in CANDIDATES for mode in _modes(layout)]


# Padded rows shorter than the model's seq_length, so that under SP at TP=2 the second rank's
# half of each row holds real tokens (a half of padding alone has no effect on the losses).
PADDED_SEQ = 48


def _micro_batches(config, packed: bool):
    from megatron_vwlmm.model import collate_packed, collate_samples

    samples = cases.raw_samples()
    if packed:
        # Two micro-batches of two packed rows each (2 x seq_length positions, B = 1).
        samples = [s for seed in range(4) for s in cases.raw_samples(seed)]
        batches, _ = collate_packed(samples, seq_length=cases.SEQ, rows_per_micro_batch=2,
                                    num_patches=config.num_patches, pad_token_id=0)
        return batches[:2]
    return [collate_samples(part, seq_length=PADDED_SEQ, num_patches=config.num_patches,
                            pad_token_id=0) for part in (samples[:2], samples[2:])]


def _build(pif: bool, sequence_parallel: bool = False):
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.config import RuntimeOptions

    config = cases.tiny_config(pif=pif)
    model = build_model(config, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(),
                        runtime=RuntimeOptions(sequence_parallel=sequence_parallel))
    return config, model


def _use_layout(tp: int, pp: int) -> None:
    """Rebuild megatron's groups for another layout in the same ranks (saves process starts;
    spare ranks become data-parallel replicas, which see the same batches here)."""
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(1234)


def _save_initial_weights(root: str) -> None:
    from megatron.core import dist_checkpointing

    for mode, (pif, _) in MODES.items():
        _, model = _build(pif)
        cases.perturb_(model)
        if torch.distributed.get_rank() == 0:
            os.makedirs(f"{root}/{mode}/weights")
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), f"{root}/{mode}/weights")


def _run_layout(root: str, layout: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vwlmm.model.forward_step import forward_step
    from megatron_vwlmm.parallel.stage_replicas import allreduce_stage_replicated_grads

    sequence_parallel = LAYOUTS[layout][2]
    losses, positions = {}, set()
    for mode, (pif, packed) in _modes(layout).items():
        config, model = _build(pif, sequence_parallel)
        state = dist_checkpointing.load(model.sharded_state_dict(), f"{root}/{mode}/weights")
        model.load_state_dict(state)
        batches = _micro_batches(config, packed)
        # The positions each decoder layer of this rank sees (a TP share under SP).
        model.language_model.decoder.layers[0].register_forward_pre_hook(
            lambda _, args, kwargs: positions.add(kwargs["hidden_states"].shape[0]),
            with_kwargs=True)
        result = get_forward_backward_func()(
            forward_step_func=lambda it, m: forward_step(next(it), m),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=batches[0].tokens.shape[1],
            micro_batch_size=batches[0].tokens.shape[0],
            forward_only=False,
        )
        allreduce_stage_replicated_grads([model])
        if sequence_parallel:
            # megatron's finalize_model_grads (the trainer's path) sums the gradients of the
            # replicated norms, each computed on this rank's share of the sequence, over TP.
            for param in model.parameters():
                if getattr(param, "sequence_parallel", False) and param.grad is not None:
                    torch.distributed.all_reduce(param.grad,
                                                 group=ps.get_tensor_model_parallel_group())
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.grad if param.grad is not None else torch.zeros_like(param))
        grads_dir = f"{root}/{mode}/grads-{layout}"
        if torch.distributed.get_rank() == 0:
            os.makedirs(grads_dir)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), grads_dir)
        losses[mode] = [{k: float(v) for k, v in r.items()} for r in result]
    losses["decoder positions"] = sorted(positions)
    return losses


def _gather_full_grads(root: str) -> dict:
    from megatron.core import dist_checkpointing

    full = {}
    for layout in LAYOUTS:
        for mode, (pif, _) in _modes(layout).items():
            _, model = _build(pif)
            state = dist_checkpointing.load(model.sharded_state_dict(),
                                            f"{root}/{mode}/grads-{layout}")
            model.load_state_dict(state)
            full[(mode, layout)] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return full


def _all_layouts(root: str) -> dict:
    """Every layout in one 4-rank launch: weights, each layout's run, then the gather."""
    from megatron.core import parallel_state as ps

    _use_layout(1, 1)
    _save_initial_weights(root)
    losses = {}
    for layout, (tp, pp, _) in LAYOUTS.items():
        _use_layout(tp, pp)
        result = _run_layout(root, layout)
        # Losses live on the last pipeline stage; collect them from the last rank.
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, result if ps.is_pipeline_last_stage() else None)
        losses[layout] = gathered[-1]
    _use_layout(1, 1)
    grads = _gather_full_grads(root)  # collective loads: every (replica) rank takes part
    return {"losses": losses, "grads": grads if torch.distributed.get_rank() == 0 else None}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    result = run_on_ranks(_all_layouts, 4, args=(root,))[0]
    return result["losses"], result["grads"]


@pytest.mark.parametrize("layout, mode", CASES)
def test_losses_equal_tp1pp1(layouts, layout, mode):
    losses, _ = layouts
    reference, candidate = losses["tp1pp1"][mode], losses[layout][mode]
    assert len(reference) == len(candidate) == 2
    for ref_mb, cand_mb in zip(reference, candidate):
        assert ref_mb["vm_loss"] > 0
        # The reported total is the micro-batch's own (lambda_vm = 1), not the schedule's
        # in-place division of it by the number of micro-batches.
        assert cand_mb["total_loss"] == pytest.approx(cand_mb["lm_loss"] + cand_mb["vm_loss"])
        for key in ("lm_loss", "vm_loss", "total_loss"):
            assert cand_mb[key] == pytest.approx(ref_mb[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("layout, mode", CASES)
def test_gradients_equal_tp1pp1(layouts, layout, mode):
    _, grads = layouts
    reference, candidate = grads[(mode, "tp1pp1")], grads[(mode, layout)]
    checked = 0
    for name, ref in reference.items():
        if ref.abs().sum() == 0:
            continue  # frozen vision encoder
        err = float((candidate[name] - ref).norm() / ref.norm())
        assert err <= 1e-5, (name, err)
        checked += 1
    assert checked >= 30  # every trainable tensor: decoder, embeddings, adapter, VM head
    # The adapter and the VM head are trained through the stage copies at PP=2.
    assert any(n.startswith("adapter.") for n in reference)


def test_sequence_parallel_layers_see_a_tp_share_of_the_sequence(layouts):
    """Under SP each decoder layer of a TP=2 rank runs on half of the micro-batch's positions
    (padded rows; packed: 2 rows of seq_length); without it, on all of them."""
    losses, _ = layouts
    whole = [PADDED_SEQ, 2 * cases.SEQ]
    assert losses["tp2"]["decoder positions"] == whole[:1]
    assert losses["tp2_sp"]["decoder positions"] == [n // 2 for n in whole]
    assert losses["tp2pp2_sp"]["decoder positions"] == [n // 2 for n in whole]
