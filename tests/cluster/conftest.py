"""Session fixtures for the cluster tests: one real single-node Slurm shared by the quick tests,
one two-node Slurm in network namespaces for the multi-node ones, and a one-node preprocessing
job that tests on both check."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import pytest

from tests.cluster.cluster_jobs import (PreprocessInputs, PreprocessRun, job_env,
                                       submit_preprocess, write_preprocess_inputs)
from tests.cluster.slurm_harness import LocalSlurm, SlurmUnavailable, missing_prerequisites


def _running(what: str, prefix: str, start, multi_node: bool = False):
    """Yield the cluster ``start(root)`` brings up in a fresh /tmp directory, then stop it and
    remove the directory. Skips (with the reason) where the machine cannot host it; fails when
    it could but the cluster did not start."""
    why = missing_prerequisites(multi_node=multi_node)
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = start(root)
    except SlurmUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"{what} did not start: {exc}")
    for note in cluster.notes:
        print(f"[{what}] {note}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm on 127.0.0.1; stopped by PID after the session.

    Lives in a fresh /tmp directory, not pytest's tmp_path: munged insists that its socket
    directory is world-searchable, and /tmp/pytest-of-<user> is 0700.
    """
    yield from _running("local Slurm", "vwlmm-slurm-", LocalSlurm.start)


@pytest.fixture(scope="session")
def slurm_lan():
    """A running Slurm with a controller and nodes node1, node2, each in its own network
    namespace on a private bridge (tests/cluster/netns.py); torn down (daemons by PID,
    namespaces, bridge) after the session."""
    yield from _running("two-node Slurm", "vwlmm-slurm-lan-",
                        lambda root: LocalSlurm.start_on_lan(root, num_nodes=2), multi_node=True)


@pytest.fixture(scope="session")
def preprocess_inputs(tmp_path_factory) -> PreprocessInputs:
    return write_preprocess_inputs(tmp_path_factory.mktemp("preprocess-inputs"))


@pytest.fixture(scope="session")
def one_node_preprocess_job(slurm, preprocess_inputs, tmp_path_factory) -> Tuple[Path, str]:
    """ray_preprocess.sbatch with the real entrypoint, submitted to the single-node Slurm and
    not waited for (a test that mostly waits can start it early); (submit dir, job id)."""
    work = tmp_path_factory.mktemp("one-node-preprocess")
    return work, submit_preprocess(slurm, work, 1, preprocess_inputs, env=job_env())


@pytest.fixture(scope="session")
def one_node_preprocess(slurm, one_node_preprocess_job) -> PreprocessRun:
    """That job, finished: checked by test_ray_preprocess_sbatch.py, and the bytes the
    multi-node run must reproduce."""
    work, job = one_node_preprocess_job
    return PreprocessRun(work, job, slurm.wait_job(job, timeout=400))
