"""kill -9 of a whole preprocessing job at a random point (three seeds), then a rerun: the
dataset, state folder included, is byte-identical to an uninterrupted run.

The job runs in a forked child of the test process with its tasks in that same process
(tests/preprocessing/inline_job.py), so SIGKILL to the child ends the driver and every task at
once, and no Ray start is paid per run (a kill on a real Ray cluster, at one point, is
tests/preprocessing/test_ray_jobs.py::test_killed_job_resumes_identically). The kill point is
drawn as the number of files the job has written: every step writes files (scan, digests,
dedup, plan, units, shards, finalize), so the seeds land in different steps.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest

from tests.preprocessing.inline_job import llava_config, llava_inputs, run_inline
from tests.preprocessing.pp_checks import tree_digest


def _num_files(root) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return llava_inputs(tmp_path_factory.mktemp("kill_inputs"), n=12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_point_then_rerun_is_byte_identical(inputs, tokenizer_dir, tmp_path,
                                                               monkeypatch, seed):
    data, images = inputs
    run_inline(monkeypatch, llava_config(data, images, tokenizer_dir, tmp_path / "clean"))
    reference = tree_digest(tmp_path / "clean")
    kill_at = random.Random(seed).randint(1, len(reference) - 1)
    out = tmp_path / "out"
    cfg = llava_config(data, images, tokenizer_dir, out)
    child = multiprocessing.get_context("fork").Process(target=run_inline, args=(monkeypatch, cfg))
    child.start()
    try:
        deadline = time.time() + 120
        while _num_files(out) < kill_at and child.is_alive():
            assert time.time() < deadline, "the job neither progressed nor ended"
            time.sleep(0.001)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL, "the job ended before the kill"
    assert not (out / "manifest.json").exists()
    run_inline(monkeypatch, cfg)
    assert tree_digest(out) == reference
