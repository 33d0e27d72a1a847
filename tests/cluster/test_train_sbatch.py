"""cluster/slurm/train.sbatch on a real (single-node) Slurm, with the real trainer and gloo.

2 processes on the one node, through both launchers: torchrun (one task per node, c10d
rendezvous) and srun (one task per process). The tiny-cpu preset, shortened with --set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.cluster_jobs import (job_env, latest_checkpoint, read, train_args,
                                       train_iterations, wait_while_running,
                                       write_train_dataset)
from tests.cluster.slurm_harness import job_id

ITERS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_train_dataset(tmp_path_factory.mktemp("train-data"))


def test_preempted_run_checkpoints_and_next_submission_resumes(slurm, dataset, tmp_path):
    """TERM mid-run -> checkpoint; resubmitting the same command resumes and finishes."""
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, "checkpoint.save_interval=0", iters=ITERS)

    # 1) srun launcher (2 Slurm tasks), preempted. Under the torchrun launcher the agent also
    # gets the TERM and can take down the rendezvous store while the ranks still write their
    # checkpoint (seen here once in three runs); with srun each rank gets the signal directly.
    first = slurm.sbatch(["--ntasks-per-node=2", f"--output={tmp_path}/first.out", *args],
                         wait=False, env=job_env(VWLMM_LAUNCHER="srun"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    job = job_id(first)
    wait_while_running(slurm, job, lambda: bool(train_iterations(run_dir)), "training step",
                       tmp_path / "first.out", timeout=240)
    assert slurm.run_client(["scancel", "--signal=TERM", job]).returncode == 0
    slurm.wait_job_state(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=180)
    out = read(tmp_path / "first.out")
    done_first = train_iterations(run_dir)
    stopped_at = max(done_first)
    assert 1 <= stopped_at < ITERS, out
    assert latest_checkpoint(run_dir) == f"iter_{stopped_at:07d}", out
    # Every rank wrote its own log into the job directory.
    logs = tmp_path / f"slurm_logs/vwlmm-train-{job}/logs"
    assert sorted(p.name for p in logs.glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]

    # 2) Same command, torchrun launcher (one task, 2 processes): resumes after the
    # checkpoint and finishes.
    second = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/second.out", *args],
                          env=job_env(VWLMM_NPROC_PER_NODE="2"), cwd=tmp_path, timeout=400)
    out = read(tmp_path / "second.out")
    assert second.returncode == 0, out
    resumed = train_iterations(run_dir)[len(done_first):]
    assert resumed == list(range(stopped_at + 1, ITERS + 1)), (done_first, resumed, out)
    assert latest_checkpoint(run_dir) == f"iter_{ITERS:07d}", out
    assert "1 node(s) x 2 process(es) (torchrun, c10d)" in out


def test_failing_training_fails_the_job(slurm, dataset, tmp_path):
    """A trainer error (TP=3 does not divide the 2 processes) fails the job, with the error."""
    args = train_args(dataset, tmp_path / "run", "parallel.tp=3", iters=ITERS)
    res = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/job.out", *args],
                       env=job_env(VWLMM_NPROC_PER_NODE="2"), cwd=tmp_path, timeout=300)
    out = read(tmp_path / "job.out")
    assert res.returncode != 0, out
    assert "config error: parallel.tp=3" in out and "training failed" in out, out
    assert not latest_checkpoint(tmp_path / "run")
