"""The local Slurm harness itself: jobs run, failures propagate, nothing listens off loopback."""

from __future__ import annotations

import psutil


def test_job_runs_two_tasks_and_failure_propagates(slurm, tmp_path):
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/bash\nsrun --ntasks=2 bash -c 'echo task=$SLURM_PROCID'\n")
    res = slurm.sbatch(["--ntasks=2", f"--output={tmp_path}/ok.out", str(ok)])
    assert res.returncode == 0, res.stderr + slurm.logs()
    assert sorted((tmp_path / "ok.out").read_text().split()) == ["task=0", "task=1"]

    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nsrun --ntasks=1 bash -c 'exit 7'\n")
    res = slurm.sbatch([f"--output={tmp_path}/bad.out", str(bad)])
    assert res.returncode == 7, (res.returncode, res.stderr)


def test_daemons_listen_on_loopback_only(slurm):
    pids = slurm.pids()
    assert set(pids) == {"munged", "slurmctld", "slurmd"}
    for name in ("slurmctld", "slurmd"):
        listening = [c.laddr for c in psutil.Process(pids[name]).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening, f"{name} listens nowhere"
        assert all(addr.ip == "127.0.0.1" for addr in listening), (name, listening)
