"""cluster/slurm/ray_node.sh, with a stand-in `ray` on PATH: the node's address and temp dir go
to `ray start`, and the teardown signal decides whether a worker removes its temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.cluster.cluster_jobs import REPO, read

# `ray start --block` stand-in: notes its arguments, then blocks until SIGTERM (trapped before
# the arguments are written: the test signals as soon as they are there).
FAKE_RAY = """#!/usr/bin/env bash
trap 'echo stopped >> "$RAY_ARGS"; exit 0' TERM
echo "$@" > "$RAY_ARGS"
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize("sig, removed", [(signal.SIGUSR2, True), (signal.SIGUSR1, False)])
def test_worker_removes_its_temp_dir_only_after_success(tmp_path, sig, removed):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/ray").write_text(FAKE_RAY)
    (tmp_path / "bin/ray").chmod(0o755)
    ray_tmp = tmp_path / "ray-tmp"
    (ray_tmp / "session_1").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "VWLMM_ROOT": str(REPO),
           "VWLMM_RAY_TMPDIR": str(ray_tmp), "RAY_ARGS": str(tmp_path / "args"),
           "SLURMD_NODENAME": "node7", "VWLMM_NODE_ADDRS": "node3=10.9.9.3 node7=127.0.0.1"}
    log = tmp_path / "stderr"  # a file, not a pipe: readable while the script still runs
    with open(log, "w") as stderr:
        proc = subprocess.Popen(["bash", str(REPO / "cluster/slurm/ray_node.sh"), "worker",
                                 "10.9.9.3:6379", "--num-cpus=2"], env=env, stderr=stderr,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "args").exists():
            assert proc.poll() is None and time.monotonic() < deadline, read(log)
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, read(log)
    finally:
        if proc.poll() is None:  # the script and its stand-in `ray`
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    args = read(tmp_path / "args").splitlines()
    # This node's own address from the job's node list, never the hostname's.
    assert args[0] == (f"start --block --address=10.9.9.3:6379 --node-ip-address=127.0.0.1 "
                       f"--temp-dir={ray_tmp} --num-cpus=2")
    assert args[1:] == ["stopped"]
    assert ray_tmp.exists() != removed
    assert ("stopped; removed" in read(log)) == removed
