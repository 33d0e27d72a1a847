"""kill -9 of a whole preprocessing job inside each of its steps, then a rerun: the dataset, state
folder included, is byte-identical to an uninterrupted run, and the rerun reuses what the killed
run had finished instead of redoing it.

The job runs in a forked child of the test process with its tasks in that same process
(tests/preprocessing/inline_job.py), so SIGKILL ends the driver and every task at once, and no
Ray start is paid per run (a kill on a real Ray cluster is
tests/preprocessing/test_ray_jobs.py::test_killed_job_resumes_identically). Every file a job
writes is a ``StagedFile`` commit, in an order fixed by the inputs and the config; the child
SIGKILLs itself as it is about to rename the temp file of a chosen file into place, so each kill
provably lands where it is meant to: every earlier file committed, this one half-written.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from tests.preprocessing.inline_job import llava_config, llava_inputs, run_inline
from tests.preprocessing.pp_checks import tree_digest
from vwlmm_data import storage
from vwlmm_data.run_lock import LOCK_NAME

# The file whose commit each run is killed at, one per step of the job.
KILL_AT = {
    "scan": "_state/records/000000-000002.jsonl",
    "digests": "_state/digests/000000-000003.json",
    "dedup": "_state/dedup/p0001/first/000000.sections",
    "plan": "_state/plan.json",
    "units": "_state/units/000002.json",  # the unit's shard and index committed, its record not
    "finalize": "manifest.json",
}
# What a resume takes over from the killed run rather than redoing: each step's results.
REUSED = ("scan/*.json", "digests/*.json", "dedup/**/*.sections", "plan/*.json", "units/*.json")


def _committed(monkeypatch) -> list[str]:
    """Patches ``StagedFile.commit`` to record each target; returns the list it appends to."""
    targets: list[str] = []
    real = storage.StagedFile.commit

    def commit(self):
        targets.append(self.target)
        real(self)

    monkeypatch.setattr(storage.StagedFile, "commit", commit)
    return targets


def _run_killed_at_commit(monkeypatch, cfg, n: int) -> None:
    """In the child: run the job, SIGKILLed as its ``n``-th file is about to be committed."""
    real = storage.StagedFile.commit
    count = [0]

    def commit(self):
        count[0] += 1
        if count[0] == n:
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(self)

    storage.StagedFile.commit = commit  # this process only: it ends here
    run_inline(monkeypatch, cfg)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _reused(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each reusable result: a file rewritten by the rerun changes both."""
    state = root / "_state"
    return {str(p.relative_to(state)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for pattern in REUSED for p in state.glob(pattern)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir):
    """The inputs, and the uninterrupted run's file digests and commit order."""
    root = tmp_path_factory.mktemp("kill")
    data, images = llava_inputs(root / "in", n=12)
    with pytest.MonkeyPatch.context() as mp:
        targets = _committed(mp)
        run_inline(mp, llava_config(data, images, tokenizer_dir, root / "clean"))
    order = [os.path.relpath(t, root / "clean") for t in targets]
    digest = tree_digest(root / "clean")
    assert sorted(order) == sorted(digest), "every file of the job is one StagedFile commit"
    return data, images, digest, order


@pytest.mark.parametrize("step", list(KILL_AT))
def test_kill_9_in_each_step_then_rerun_is_byte_identical(reference, tokenizer_dir, tmp_path,
                                                          monkeypatch, step):
    data, images, digest, order = reference
    n = order.index(KILL_AT[step]) + 1
    out = tmp_path / "out"
    cfg = llava_config(data, images, tokenizer_dir, out)
    child = multiprocessing.get_context("fork").Process(target=_run_killed_at_commit,
                                                        args=(monkeypatch, cfg, n))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        pytest.fail("the job neither reached its kill point nor ended")
    assert child.exitcode == -signal.SIGKILL, "the job ended before the kill"
    # Mid-job: exactly the files committed before the kill, and the killed one's temp file.
    files = _files(out)
    # The killed job's lock file stays (the next job takes it over: vwlmm_data/run_lock.py).
    assert LOCK_NAME in files
    files.discard(LOCK_NAME)
    temps = {f for f in files if storage.is_staging_name(os.path.basename(f))}
    assert files - temps == set(order[:n - 1])
    assert [os.path.dirname(t) for t in temps] == [os.path.dirname(KILL_AT[step])]
    reused = _reused(out)
    units_done = sum(1 for f in reused if f.startswith("units/"))

    summary = run_inline(monkeypatch, cfg)
    assert tree_digest(out) == digest
    assert summary.units_skipped == units_done
    after = _reused(out)
    assert {f: after.get(f) for f in reused} == reused, "the rerun redid finished work"
