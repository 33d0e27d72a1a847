"""Sequence packing in the real trainer (torchrun, gloo, CPU): per-token normalisation makes the
loss of a global batch independent of packing, validation is token-weighted, and a packed run
resumes exactly after SIGKILL, also into another layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.synthetic import make_samples, write_dataset
from tests.pipeline.launch import checkpoint_tensors, losses, train

pytestmark = pytest.mark.timeout(600)

PACKED = ["data.packing=true", "data.micro_batch_size=1", "optim.loss_normalization=per_token"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """48 caption samples of 21-45 positions (rows of 64 hold one to three), Arrow."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root), make_samples(48, seed=11, caption_len=(3, 27)), shard_size=12,
                  formats=("arrow",))
    return root


def _valid(run: Path) -> dict:
    with open(run / "metrics.jsonl") as f:
        return {r["iteration"]: r for r in map(json.loads, f) if r["split"] == "valid"}


def _keys(run: Path, ranks: int) -> dict:
    """iteration -> the set of sample keys the step trained on (all DP ranks)."""
    out: dict = {}
    for r in range(ranks):
        for line in (run / "samples" / f"dp{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["iteration"], set()).update(rec["keys"])
    return out


def test_per_token_loss_and_validation_do_not_depend_on_packing(dataset, tmp_path):
    sets = ["parallel.tp=1", "train.train_iters=1", "data.global_batch_size=8",
            "optim.warmup_iters=0",
            "optim.loss_normalization=per_token", "data.valid_fraction=0.25",
            "train.eval_interval=1", "train.eval_iters=2"]
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    train(1, dataset, padded, sets + ["data.micro_batch_size=2"])
    train(1, dataset, packed, sets + ["data.packing=true", "data.micro_batch_size=1"])
    a, b = losses(padded)[1], losses(packed)[1]
    assert a["micro_batches"] == 4 and b["micro_batches"] < 8  # fewer rows than samples
    assert b["padding_fraction"] < a["padding_fraction"]
    assert a["tokens_per_s"] > 0 and b["supervised_tokens"] == a["supervised_tokens"]
    for key in ("lm_loss", "vm_loss", "total_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    va, vb = _valid(padded)[1], _valid(packed)[1]
    for key in ("valid_lm_loss", "valid_vm_loss", "valid_total_loss"):
        assert vb[key] == pytest.approx(va[key], rel=1e-5), key
    wa = checkpoint_tensors(padded / "checkpoints/iter_0000001")
    wb = checkpoint_tensors(packed / "checkpoints/iter_0000001")
    for key in wa:
        if key.startswith("model."):
            assert torch.allclose(wa[key], wb[key], rtol=1e-5, atol=1e-7), key


def test_normalisation_switch_reaches_megatron_and_the_loss():
    """per_micro_batch: megatron's 2-tuple (its own averaging); per_token: the 3-tuple of sums
    over the global batch's totals, with megatron's averaging off (calculate_per_token_loss)."""
    from megatron_vwlmm.model.forward_step import TokenTotals, loss_func
    from pipeline.config import load_config
    from tests.pipeline.launch import REPO

    stats = torch.tensor([12.0, 4.0, 0.5, 2.0])  # lm_sum, lm_count, vm_sum, vm_count
    total, metrics = loss_func(2.0, stats)
    assert float(total) == pytest.approx(12 / 4 + 2.0 * 0.5 / 2)
    total, num_tokens, metrics = loss_func(2.0, stats, token_totals=TokenTotals(40, 10))
    assert float(total) == pytest.approx(12 / 40 + 2.0 * 0.5 / 10) and int(num_tokens) == 4
    assert float(metrics["lm_sum"]) == 12 and float(metrics["vm_count"]) == 2
    for mode, flag in (("per_micro_batch", False), ("per_token", True)):
        cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"),
                          ["parallel.tp=1", f"optim.loss_normalization={mode}"])
        assert cfg.runtime().calculate_per_token_loss is flag


def test_packed_resume_after_kill_is_exact(dataset, tmp_path):
    """DP=2, packed: 6 steps straight == 3 steps, SIGKILL, resume: bitwise (losses, weights,
    optimizer, samples per step). Then the step-3 checkpoint resumed at PP=4 (two middle stages
    that read no data and get each packed micro-batch's layout from the first stage) reads the
    same samples and its next losses agree within 1e-5."""
    sets = PACKED + ["parallel.tp=1", "train.train_iters=6", "checkpoint.save_interval=3",
                     "data.global_batch_size=8", "logging.record_sample_keys=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(2, dataset, straight, sets)
    killed = train(2, dataset, resumed, sets, expect_rc=None, faults=["kill_after_step=3"])
    assert killed.returncode != 0
    again = train(2, dataset, resumed, sets)
    assert "resumed from" in again.stdout

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        for key in ("lm_loss", "vm_loss", "grad_norm", "lr", "consumed_samples",
                    "micro_batches"):
            assert a[it][key] == b[it][key], f"iteration {it} {key}"
    wa = checkpoint_tensors(straight / "checkpoints/iter_0000006")
    wb = checkpoint_tensors(resumed / "checkpoints/iter_0000006")
    assert wa.keys() == wb.keys() and any(k.startswith("optimizer.") for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    keys = _keys(straight, 2)
    assert _keys(resumed, 2) == keys and all(len(v) == 8 for v in keys.values())

    other = tmp_path / "pp4"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints/iter_0000003", other / "checkpoints/iter_0000003")
    (other / "checkpoints/latest").write_text("iter_0000003\n")
    out = train(4, dataset, other, sets + ["parallel.pp=4"])
    assert "layout TP=1 PP=4" in out.stdout and "resumed from" in out.stdout
    c = losses(other)
    assert sorted(c) == [4, 5, 6]
    assert {it: ks for it, ks in _keys(other, 1).items()} == {it: keys[it] for it in (4, 5, 6)}
    for it in (4, 5, 6):
        for key in ("lm_loss", "vm_loss"):
            assert abs(c[it][key] - a[it][key]) <= 1e-5, (it, key, c[it][key], a[it][key])
