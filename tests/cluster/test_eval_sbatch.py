"""cluster/slurm/eval.sbatch outside Slurm's daemons: a stand-in ``srun`` records its options and
runs the step, so the script's own work (finding the repository, the environment, the GPU
warning, passing arguments and the exit code through) is checked without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.eval_paper import PRESET, resolve_tasks

REPO = Path(__file__).resolve().parents[2]
EVAL_SBATCH = REPO / "cluster/slurm/eval.sbatch"
# srun's options up to the first word that is not one, then the step itself.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SRUN_ARGS_FILE"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""


def _run(tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", VWLMM_ROOT=str(REPO), VWLMM_ENV="none",
               VWLMM_EVAL_CMD=f"{sys.executable} -m pipeline.eval_paper",
               SRUN_ARGS_FILE=str(tmp_path / "srun.args"), **env_extra)
    return subprocess.run(["bash", str(EVAL_SBATCH), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_eval_sbatch_runs_the_command_as_one_step(tmp_path):
    res = _run(tmp_path, "--list-tasks", SLURM_JOB_ID="41", SLURM_CPUS_PER_TASK="6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ",".join(resolve_tasks(PRESET))
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[:3] == ["--ntasks=1", "--kill-on-bad-exit=1", "--cpus-per-task=6"]
    assert srun_args[-2:] == ["pipeline.eval_paper", "--list-tasks"]
    assert "warning: no GPU in this job" in res.stderr

    with_gpu = _run(tmp_path, "--list-tasks", SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="1")
    assert with_gpu.returncode == 0 and "warning" not in with_gpu.stderr, with_gpu.stderr
    assert "GPUs: 1" in with_gpu.stderr


def test_eval_sbatch_exit_codes(tmp_path):
    failed = _run(tmp_path, str(tmp_path / "absent"), SLURM_JOB_ID="43", SLURM_GPUS_ON_NODE="1")
    assert failed.returncode == 2 and "no lmms-eval results" in failed.stderr, failed.stderr
    assert _run(tmp_path, "--help").returncode == 0
    assert _run(tmp_path).returncode == 2  # no arguments: the usage, and a failure
    outside = _run(tmp_path, "--list-tasks")  # not under sbatch
    assert outside.returncode == 2 and "submit this script with sbatch" in outside.stderr
