"""A unit whose worker dies on every attempt fails the job after a bounded number of retries,
with the unit named, instead of being retried without end."""

from __future__ import annotations

import subprocess
import sys

from preprocessing.scheduling import MAX_RETRIES
from tests import faults
from tests.preprocessing.pp_checks import llava_args


def test_a_unit_that_cannot_finish_fails_the_job_naming_it(ray_head, demo, tokenizer_dir,
                                                           tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "preprocessing.cli",
           *llava_args(demo, tokenizer_dir, "vicuna_v1", out), "--num-workers", "1",
           "--ray-address", ray_head["address"]]
    res = subprocess.run(cmd, env={**ray_head["env"], **faults.env("crash_unit_always=1")},
                         capture_output=True, text=True, timeout=400)
    assert res.returncode != 0
    assert "process_unit on unit 1 of " in res.stderr, res.stderr[-3000:]
    assert f"each of {MAX_RETRIES + 1} attempts" in res.stderr
    assert not (out / "manifest.json").exists()
