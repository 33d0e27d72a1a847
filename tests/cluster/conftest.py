"""Session fixtures for the cluster tests: one real local Slurm shared by every test here."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.cluster.slurm_harness import LocalSlurm, SlurmUnavailable, missing_prerequisites

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm on 127.0.0.1; stopped by PID after the session.

    Lives in a fresh /tmp directory, not pytest's tmp_path: munged insists that its socket
    directory is world-searchable, and /tmp/pytest-of-<user> is 0700.
    """
    why = missing_prerequisites()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="vwlmm-slurm-"))
    try:
        cluster = LocalSlurm.start(root)
    except SlurmUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"local Slurm did not start: {exc}")
    for note in cluster.notes:
        print(f"[local slurm] {note}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
