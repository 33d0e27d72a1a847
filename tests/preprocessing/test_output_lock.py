"""A second `vwlmm-preprocess` on an --output that a running job holds is refused, naming the
running job's host and PID, before it reads, deletes or writes anything there."""

from __future__ import annotations

import logging
import os
import socket

from preprocessing.cli import main
from tests.preprocessing.pp_checks import laion_args
from vwlmm_data.run_lock import LOCK_NAME, RunLock


def test_a_second_job_on_a_held_output_is_refused(tmp_path, demo, tokenizer_dir, caplog):
    out = tmp_path / "out"
    with RunLock(str(out), "vwlmm-preprocess"), caplog.at_level(logging.ERROR):
        rc = main([*laion_args(demo, tokenizer_dir, out), "--overwrite", "--no-progress"])
        assert rc == 1
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing written, nothing deleted
    message = caplog.text
    assert f"host {socket.gethostname()}, PID {os.getpid()}" in message, message
    assert "vwlmm-preprocess" in message
