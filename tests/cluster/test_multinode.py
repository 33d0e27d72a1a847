"""cluster/slurm/*.sbatch on two nodes of a real Slurm whose controller and nodes each live in
their own network namespace (the ``slurm_lan`` fixture): every node has its own address, and
the hostname, shared by all, resolves to loopback on each, so a script that finds peers by
hostname, or lets gloo pick an interface, fails here as it would on a cluster.

Training (tiny-cpu, fp32, gloo): TP=2 across the nodes (torchrun launcher, one process per node)
and PP=2 across the nodes (srun launcher) give bitwise the losses of the same layout run as 2
processes on one node (the single-node ``slurm``, at the same time): bit for bit, since a
reduction over two ranks is one floating-point addition, which is commutative, and PP only
sends tensors, so where a rank runs cannot change a bit. A node that dies mid-run
(cable cut, every process SIGKILLed) ends the job within the collective timeout plus a stated
margin, the job names the node, and the resubmitted job resumes from the last checkpoint with
bitwise the losses of the uninterrupted run.
Preprocessing (Ray head on node1, worker on node2): units are processed on both nodes; the
worker's processes, SIGKILLed mid-unit, cost only that unit, which Ray reruns on the head; the
dataset is byte-identical to the one-node run's; the job's Ray refuses clients without its
token.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.cluster.cluster_jobs import (job_env, job_port, latest_checkpoint, read,
                                       submit_preprocess, train_args, train_iterations,
                                       train_records, wait_while_running, write_train_dataset)
from tests.cluster.located_preprocess import DELAY_ENV, MARKS_ENV, read_marks
from tests.cluster.slurm_harness import JOB_ENDED, job_id
from tests.pipeline.launch import losses
from tests.preprocessing.pp_checks import tree_digest

ITERS = 6
COMPARED = ("lm_loss", "vm_loss", "total_loss", "grad_norm")
# The dead-node run: collectives time out after TIMEOUT_S; the step is aborted EXIT_WAIT s after
# srun reports the first failed task. MARGIN covers the rest: the step that was running (~3 s),
# the failed rank's and torchrun's exits (~5 s), srun's abort (KillWait + 2 = 12 s), the probe
# naming the node (5 s), polling (~2 s), and as much again for a loaded machine.
TIMEOUT_S, EXIT_WAIT, MARGIN = 20, 5, 60
ENDED = JOB_ENDED + ("COMPLETING",)  # the batch script is done; a dead node keeps it completing
FOREIGN_TOKEN = "a-token-of-another-ray-cluster"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_train_dataset(tmp_path_factory.mktemp("train-data"))


@dataclass
class TrainJob:
    """A submitted train.sbatch job; its logs are under the submit directory, ``run_dir``'s
    parent."""

    slurm: object
    job: str
    run_dir: Path
    out: Path  # the job's output file

    @property
    def job_dir(self) -> Path:
        return self.run_dir.parent / f"slurm_logs/vwlmm-train-{self.job}"

    def finished(self) -> Dict[int, Dict[str, float]]:
        """Wait for the job; assert it trained ITERS steps; its losses by iteration."""
        rc = self.slurm.wait_job(self.job, timeout=400)
        text = read(self.out)
        assert rc == 0, text[-6000:]
        assert train_iterations(self.run_dir) == list(range(1, ITERS + 1)), text[-3000:]
        return losses(self.run_dir)


def submit_train(slurm, data: Path, run_dir: Path, nodes: int, per_node: int, launcher: str,
                 *sets: str, env: Optional[Dict[str, str]] = None,
                 out: Optional[Path] = None) -> TrainJob:
    """train.sbatch on ``nodes`` nodes with ``per_node`` processes each (one task per process
    under srun, one 2-CPU task per node under torchrun); output in ``out`` (``<run_dir>.out``)."""
    out = out or run_dir.with_suffix(".out")
    per_task = f"--ntasks-per-node={per_node}" if launcher == "srun" else "--cpus-per-task=2"
    res = slurm.sbatch([f"--nodes={nodes}", per_task, f"--output={out}",
                        *train_args(data, run_dir, *sets, iters=ITERS)],
                       wait=False, cwd=run_dir.parent,
                       env=job_env(VWLMM_LAUNCHER=launcher, VWLMM_NPROC_PER_NODE=str(per_node),
                                   **(env or {})))
    assert res.returncode == 0, res.stderr
    return TrainJob(slurm, job_id(res), run_dir, out)


def ranks_by_node(job_dir: Path) -> Dict[int, str]:
    """rank -> "node (address, interface)" from the rank logs' headers."""
    out = {}
    for log in job_dir.glob("logs/rank-*.log"):
        m = re.search(r"node (\S+ \(\S+, \S+\))\s+pid \d+\s+rank (\d+)/", read(log))
        assert m, read(log)[:500]
        out[int(m.group(2))] = m.group(1)
    return out


def node_label(slurm, node: str) -> str:
    return f"{node} ({slurm.nodes[node]}, lan0)"


def assert_same_losses(records: List[dict], want: Dict[int, dict]) -> None:
    for rec in records:
        for key in COMPARED:
            assert rec[key] == want[rec["iteration"]][key], (rec, want[rec["iteration"]])


def one_and_two_nodes(slurm, slurm_lan, data: Path, work: Path, launcher: str, *sets: str):
    """The same run as 2 processes on one node (single-node Slurm) and as 1 process on each of
    two nodes (the Lan), submitted together so that they run at the same time; (one, two)."""
    one = submit_train(slurm, data, work / "one", 1, 2, launcher, *sets)
    two = submit_train(slurm_lan, data, work / "two", 2, 1, launcher, *sets)
    return one, two


@pytest.fixture(scope="module")
def tp2(slurm, slurm_lan, dataset, tmp_path_factory):
    """TP=2 under torchrun: 1 node x 2 processes, and 2 nodes x 1 process."""
    one, two = one_and_two_nodes(slurm, slurm_lan, dataset, tmp_path_factory.mktemp("tp2"),
                                 "torchrun")
    return {"one": one.finished(), "two": two.finished(), "job": two}


def test_tp2_across_two_nodes_torchrun_matches_one_node(slurm_lan, tp2):
    out = read(tp2["job"].out)
    assert "2 node(s) x 1 process(es) (torchrun, c10d)" in out
    assert f"master {slurm_lan.nodes['node1']}:" in out
    # One rank per node, each on its own address, gloo bound to the interface holding it.
    assert ranks_by_node(tp2["job"].job_dir) == {0: node_label(slurm_lan, "node1"),
                                                 1: node_label(slurm_lan, "node2")}
    assert_same_losses(list(tp2["two"].values()), tp2["one"])


def test_pp2_across_two_nodes_srun_matches_one_node(slurm, slurm_lan, dataset, tmp_path):
    one, two = one_and_two_nodes(slurm, slurm_lan, dataset, tmp_path, "srun",
                                 "parallel.tp=1", "parallel.pp=2")
    want, got = one.finished(), two.finished()
    assert "2 Slurm task(s) on 2 node(s) (srun)" in read(two.out)
    assert ranks_by_node(two.job_dir) == {0: node_label(slurm_lan, "node1"),
                                          1: node_label(slurm_lan, "node2")}
    assert_same_losses(list(got.values()), want)


def test_dead_node_ends_the_job_in_bounded_time_and_resubmission_resumes(
        slurm_lan, dataset, tp2, tmp_path, one_node_preprocess_job):
    """node2 dies after the checkpoint of step 3: the job fails within TIMEOUT_S + EXIT_WAIT +
    MARGIN naming node2; the same command, resubmitted, resumes and matches the uninterrupted
    two-node run bitwise. (``one_node_preprocess_job``, which the Ray test below compares with,
    runs on the single-node Slurm meanwhile: this test mostly waits on timeouts.)"""
    sets = ("checkpoint.save_interval=3", f"parallel.timeout_s={TIMEOUT_S}")
    env = {"VWLMM_STEP_EXIT_WAIT": str(EXIT_WAIT)}
    run_dir = tmp_path / "run"
    first = submit_train(slurm_lan, dataset, run_dir, 2, 1, "torchrun", *sets, env=env)
    with slurm_lan.cancelled_unless_ended(first.job):
        wait_while_running(
            slurm_lan, first.job, lambda: latest_checkpoint(run_dir) == "iter_0000003"
            and max(train_iterations(run_dir), default=0) >= 4, "step 4 after checkpoint 3",
            first.out)
        bound = TIMEOUT_S + EXIT_WAIT + MARGIN
        try:
            killed_at = time.monotonic()
            assert slurm_lan.kill_node("node2")
            try:
                state = slurm_lan.wait_job_state(first.job, ENDED, timeout=bound)
            except TimeoutError:
                pytest.fail(f"job {first.job} still runs {bound} s after node2 died (its peer "
                            f"rank should fail after parallel.timeout_s={TIMEOUT_S}):\n"
                            + read(first.out)[-4000:])
            took = time.monotonic() - killed_at
        finally:
            slurm_lan.revive_node("node2")
    text = read(first.out)
    print(f"[dead node] job {first.job} ended ({state}) {took:.1f} s after node2 died "
          f"(bound {bound} s = timeout {TIMEOUT_S} + exit wait {EXIT_WAIT} + margin {MARGIN})")
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in text and "training failed" in text, \
        text[-4000:]
    assert "node(s) node2 of this job do not respond" in text, text[-4000:]
    assert slurm_lan.job_field(first.job, "ExitCode") != "0:0"
    done_first = train_iterations(run_dir)
    assert latest_checkpoint(run_dir) == "iter_0000003" and max(done_first) < ITERS, done_first

    second = submit_train(slurm_lan, dataset, run_dir, 2, 1, "torchrun", *sets, env=env,
                          out=tmp_path / "second.out")
    rc = slurm_lan.wait_job(second.job, timeout=400)
    assert rc == 0, read(second.out)[-6000:]
    resumed = train_iterations(run_dir)[len(done_first):]
    assert resumed == list(range(4, ITERS + 1)), (done_first, resumed)
    assert "at iteration 3" in read(second.out), read(second.out)[-3000:]
    # Both jobs' steps, the lost step 4 included, are the uninterrupted run's, bit for bit.
    assert_same_losses(train_records(run_dir), tp2["two"])


# ---------------------------------------------------------------- preprocessing on Ray
def dashboard_answer(slurm, url: str, token: Optional[str]) -> int:
    """HTTP status of a Ray Jobs API request from the controller's host, with ``token`` as the
    bearer token (or none)."""
    probe = ("import sys, urllib.error, urllib.request as r\n"
             "auth = {'Authorization': 'Bearer ' + sys.argv[2]} if len(sys.argv) > 2 else {}\n"
             "try:\n"
             "    print(r.urlopen(r.Request(sys.argv[1], headers=auth), timeout=20).status)\n"
             "except urllib.error.HTTPError as exc:\n"
             "    print(exc.code)\n")
    res = slurm.run_client([sys.executable, "-c", probe, url, *([token] if token else [])],
                           timeout=60)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def test_ray_preprocess_on_two_nodes_survives_the_worker_and_matches_one_node(
        slurm_lan, preprocess_inputs, one_node_preprocess, tmp_path):
    """Head on node1, worker on node2, submitted with another cluster's RAY_AUTH_TOKEN in the
    environment: once units have finished on both nodes, the Jobs API refuses that token and no
    token, and the worker's processes are SIGKILLed while it runs a unit; Ray reruns that unit
    on the head, the job succeeds and the dataset is byte-identical to the one-node run's."""
    assert one_node_preprocess.returncode == 0, one_node_preprocess.out[-5000:]
    head, worker = slurm_lan.nodes["node1"], slurm_lan.nodes["node2"]
    (tmp_path / "marks").mkdir()
    job = submit_preprocess(slurm_lan, tmp_path, 2, preprocess_inputs, env=job_env(
        VWLMM_PREPROCESS_CMD="python -m tests.cluster.located_preprocess",
        **{MARKS_ENV: str(tmp_path / "marks"), DELAY_ENV: "1.0"}, RAY_AUTH_TOKEN=FOREIGN_TOKEN))
    jobs_api = f"http://{head}:{job_port(job, 2)}/api/jobs/"

    def on_worker(marks, event):
        return {m["unit"] for m in marks if m["node_ip"] == worker and m["event"] == event}

    def worker_done_one_and_runs_another() -> bool:
        marks = read_marks(tmp_path / "marks")
        return bool(on_worker(marks, "end") and on_worker(marks, "start") - on_worker(marks, "end"))

    with slurm_lan.cancelled_unless_ended(job):
        wait_while_running(slurm_lan, job, worker_done_one_and_runs_another,
                           "unit running on the worker after one finished there",
                           tmp_path / "job.out")
        killed_at = time.time()
        assert slurm_lan.kill_jobs_on("node2")  # its Ray worker node, mid-unit
        refused = {"no token": dashboard_answer(slurm_lan, jobs_api, None),
                   "the submitter's": dashboard_answer(slurm_lan, jobs_api, FOREIGN_TOKEN)}
        rc = slurm_lan.wait_job(job, timeout=400)
    out = read(tmp_path / "job.out")
    assert rc == 0, out[-5000:]
    assert set(refused.values()) <= {401, 403}, refused
    assert "Ray cluster up: 2 node(s)" in out
    assert re.search(rf"Connecting to existing Ray cluster at address: {head}:\d+", out), out
    marks = read_marks(tmp_path / "marks")
    done = {ip: sorted(m["unit"] for m in marks if m["node_ip"] == ip and m["event"] == "end")
            for ip in (head, worker)}
    lost = on_worker(marks, "start") - on_worker(marks, "end")
    redone = {m["unit"] for m in marks
              if m["node_ip"] == head and m["event"] == "end" and m["time"] > killed_at}
    print(f"[ray 2 nodes] units done on node1: {done[head]}, on node2: {done[worker]}; "
          f"running on node2 when it was killed: {sorted(lost)}, redone on node1: "
          f"{sorted(lost & redone)}; Jobs API answers {refused}")
    assert done[head] and done[worker], marks  # both nodes did work
    assert lost and lost <= redone, marks  # what died with the worker ran again on the head
    assert tree_digest(tmp_path / "dataset") == tree_digest(one_node_preprocess.dataset)
