"""The trainer's guarantees (exact resume, crash-safe saves, signals, disjoint
DP samples, learning), on the real trainer under torchrun (gloo, CPU); resharding at every
layout is `test_resume_matrix.py`'s.

Every test launches `python -m torch.distributed.run ... -m pipeline.train` (or the bare module,
as srun would) on a tiny model and checks what the run wrote: metrics.jsonl, checkpoints,
the per-rank sample log. Launches are kept few; each costs ~10 s of imports on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_vwlmm.parallel.launch import find_free_port
from pipeline.data.synthetic import make_samples, write_dataset
from pipeline.plot import main as plot_main
from tests.pipeline.launch import REPO, checkpoint_tensors, env, losses, train, train_cmd

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """40 samples in 4 shards, Arrow and WebDataset (same samples, same shard boundaries)."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root), make_samples(40, seed=7), shard_size=10)
    return root


RESUME_SETS = ["parallel.tp=1", "train.train_iters=6", "checkpoint.save_interval=3",
               "data.micro_batch_size=2", "data.global_batch_size=8"]


@pytest.mark.parametrize("fmt, nproc", [("arrow", 1), ("webdataset", 2)])
def test_resume_after_kill_is_bitwise_identical(dataset, tmp_path, fmt, nproc):
    """6 steps straight == 3 steps, SIGKILL, auto-resume 3 steps: same losses, same weights.

    WebDataset runs at DP=2 (distributed optimizer state sharded over two ranks), so the same
    launches also show DP=2 ranks reading disjoint samples whose union is the epoch.
    """
    sets = RESUME_SETS + [f"data.format={fmt}", "logging.record_sample_keys=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(nproc, dataset, straight, sets)
    killed = train(nproc, dataset, resumed, sets, expect_rc=None, faults=["kill_after_step=3"])
    assert killed.returncode != 0, "the injected SIGKILL did not stop the run"
    assert sorted(losses(resumed)) == [1, 2, 3]
    again = train(nproc, dataset, resumed, sets)
    assert "resumed from" in again.stdout and "iteration 3" in again.stdout

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        for key in ("lm_loss", "vm_loss", "grad_norm", "lr"):
            assert a[it][key] == b[it][key], f"iteration {it} {key}: {a[it][key]} != {b[it][key]}"
    wa = checkpoint_tensors(straight / "checkpoints/iter_0000006")
    wb = checkpoint_tensors(resumed / "checkpoints/iter_0000006")
    assert wa.keys() == wb.keys() and any(k.startswith("optimizer.") for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    # the first run moved the weights (the comparison above is not between two initial states)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == \
        ["iter_0000003", "iter_0000006", "latest"]

    if nproc == 2:  # DP=2: one epoch = 40 samples = 5 steps of 8
        per_rank = []
        for r in range(2):
            lines = [json.loads(x) for x in
                     (straight / "samples" / f"dp{r}.jsonl").read_text().splitlines()]
            per_rank.append([k for rec in lines if rec["iteration"] <= 5 for k in rec["keys"]])
        assert len(per_rank[0]) == len(per_rank[1]) == 20
        assert not set(per_rank[0]) & set(per_rank[1]), "DP ranks trained on the same sample"
        assert set(per_rank[0]) | set(per_rank[1]) == {f"test-{i:05d}" for i in range(40)}


def test_kill_during_save_then_ctrl_c(dataset, tmp_path):
    """(1) a process killed in the middle of a save leaves `latest` on the previous, loadable
    checkpoint; (2) Ctrl-C (SIGINT to the process group, the trainer and its loader workers)
    mid-run writes a checkpoint and exits cleanly (exit code 0, no KeyboardInterrupt). SIGINT
    takes the path of SIGTERM / SIGUSR1 (``pipeline/signals.py``), which the Slurm tests send.

    Run as a bare process (what srun starts), so the signal reaches the trainer directly.
    """
    run = tmp_path / "run"
    sets = ["parallel.tp=1", "train.train_iters=6", "checkpoint.save_interval=2"]
    crashed = train(1, dataset, run, sets, expect_rc=None, faults=["kill_during_save=4"])
    assert crashed.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert (ckpts / "iter_0000004.tmp").is_dir() and not (ckpts / "iter_0000004").exists()

    # Resume from the surviving checkpoint, then Ctrl-C after a couple of steps.
    e = env()
    e.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(find_free_port()))
    cmd = train_cmd(1, dataset, run, ["parallel.tp=1", "train.train_iters=1000",
                                      "checkpoint.save_interval=0"])
    cmd = [sys.executable] + cmd[cmd.index("-m", 3):]  # drop the torchrun launcher
    log = open(tmp_path / "ctrl_c.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while max(losses(run)) < 6:  # the crashed run logged 1..4; resume re-logs from 3
            assert proc.poll() is None, (tmp_path / "ctrl_c.log").read_text()[-4000:]
            assert time.time() < deadline, "trainer made no progress"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "ctrl_c.log").read_text()
    assert rc == 0, text[-4000:]
    assert "resumed from" in text and "iter_0000002" in text
    assert "signal received" in text and "KeyboardInterrupt" not in text
    last = max(losses(run))
    assert 2 < last < 1000
    assert (ckpts / "latest").read_text().strip() == f"iter_{last:07d}"
    assert not list(ckpts.glob("*.tmp")), "the failed save's leftovers were not cleaned up"


def test_overfit_eight_samples_halves_both_losses(tmp_path):
    """The tiny model memorises 8 samples: lm_loss and vm_loss fall to at most half."""
    data = tmp_path / "d8"
    write_dataset(str(data), make_samples(8, seed=3), shard_size=8, formats=("arrow",))
    run = tmp_path / "run"
    train(1, data, run, ["parallel.tp=1", "train.train_iters=60", "optim.lr=1e-2",
                         "optim.decay_style=constant", "optim.warmup_iters=0",
                         "checkpoint.save_interval=0"])
    rec = losses(run)
    first = {k: rec[1][k] for k in ("lm_loss", "vm_loss")}
    last = {k: sum(rec[i][k] for i in range(56, 61)) / 5 for k in first}
    assert last["lm_loss"] <= 0.5 * first["lm_loss"], (first, last)
    assert last["vm_loss"] <= 0.5 * first["vm_loss"], (first, last)

    plot_main([str(run)])  # the loss-curve CLI on a real run folder
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
