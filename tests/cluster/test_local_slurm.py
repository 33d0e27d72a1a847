"""The local Slurm harnesses themselves: jobs run, failures propagate, nothing listens off
loopback (one node), each node has its own address (two nodes in network namespaces)."""

from __future__ import annotations

import subprocess

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
    slurmd = f"slurmd:{slurm.host}"
    assert set(pids) == {"munged", "slurmctld", slurmd}
    for name in ("slurmctld", slurmd):
        listening = [c.laddr for c in psutil.Process(pids[name]).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening, f"{name} listens nowhere"
        assert all(addr.ip == "127.0.0.1" for addr in listening), (name, listening)


def test_lan_nodes_have_their_own_addresses(slurm_lan):
    """Each node of the two-node Slurm answers on its own address, while the hostname (shared
    by the namespaces) resolves to loopback there: scripts must go by Slurm's NodeAddr. The
    machine's own namespace cannot reach the nodes' subnet (nothing leaks to the real network)."""
    script = ('echo "$SLURMD_NODENAME $(ip -o -4 addr show lan0 | awk \'{print $4}\') '
              '$(getent ahostsv4 "$(hostname)" | awk \'NR==1 {print $1}\')"')
    res = slurm_lan.run_client(["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", script],
                               timeout=60)
    assert res.returncode == 0, res.stderr + slurm_lan.logs()
    seen = sorted(line.split() for line in res.stdout.splitlines())
    assert seen == [[node, f"{addr}/24", "127.0.0.1"] for node, addr in sorted(
        slurm_lan.nodes.items())]
    unreachable = subprocess.run(["ip", "route", "get", slurm_lan.nodes["node1"]],
                                 capture_output=True, text=True)
    assert unreachable.returncode != 0, unreachable.stdout
