"""What the cluster tests need besides the local Slurm: job arguments, inputs, output and run
state."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import psutil

from tests.cluster.slurm_harness import job_id

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "cluster/slurm/train.sbatch"
RAY_SBATCH = REPO / "cluster/slurm/ray_preprocess.sbatch"
TINY_CPU = REPO / "configs/tiny-cpu.yaml"


def job_env(**extra: str) -> Dict[str, str]:
    """Environment for sbatch: this interpreter's venv on PATH, unbuffered logs.

    sbatch exports the submitting environment to the job (--export=ALL), as a user's shell would.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def processes_mentioning(path: str) -> List[int]:
    """PIDs of the processes with ``path`` in their command line (e.g. a job's Ray temp dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(path in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def write_train_dataset(root: Path) -> Path:
    """A small Arrow dataset written per the data contract (pipeline/data/synthetic.py)."""
    from pipeline.data.synthetic import make_samples, write_dataset

    return Path(write_dataset(str(root), make_samples(64), 16, formats=("arrow",)))


def train_args(data: Path, run_dir: Path, *sets: str, iters: int) -> List[str]:
    """``train.sbatch tiny-cpu.yaml --set ...``: ``iters`` steps, no validation, no TensorBoard."""
    assert TINY_CPU.is_file(), f"the cluster tests train the {TINY_CPU} preset: it is missing"
    base = ["logging.tensorboard=false", "train.eval_interval=0", "data.valid_fraction=0",
            "data.num_workers=1", f"train.train_iters={iters}", f"data.path={data}",
            f"run_dir={run_dir}", *sets]
    return [str(TRAIN_SBATCH), str(TINY_CPU)] + [a for s in base for a in ("--set", s)]


@dataclass
class PreprocessInputs:
    """vwlmm-preprocess arguments (all but --output) over the LAION-style fixtures
    (preprocessing/fixtures.py), one unit (and shard) per sample, so that a job has units to
    spread over nodes; ``expected_ok``: the samples that pass the filters."""

    args: List[str]
    expected_ok: int


def write_preprocess_inputs(root: Path) -> PreprocessInputs:
    from preprocessing.fixtures import FIXTURE_FILTERS, write_demo_dataset
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    demo = write_demo_dataset(root / "raw", variants=False, max_side=64)
    tokenizer = build_mistral_hf_tokenizer(root / "tokenizer")
    filters = [a for k, v in FIXTURE_FILTERS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    args = ["--source", "laion", "--input", *demo.laion_inputs, "--tokenizer", str(tokenizer),
            "--template", "plain", "--format", "both", "--image-size", "56",
            "--max-seq-len", "256", "--samples-per-shard", "1", "--no-progress", *filters]
    return PreprocessInputs(args, sum(v == "ok" for v in demo.laion_expected.values()))


@dataclass
class PreprocessRun:
    """A finished ray_preprocess.sbatch job: its submit directory, id and exit code."""

    work: Path
    job: str
    returncode: int

    @property
    def dataset(self) -> Path:
        return self.work / "dataset"

    @property
    def out(self) -> str:
        return read(self.work / "job.out")


def submit_preprocess(slurm, work: Path, nodes: int, inputs: PreprocessInputs, *,
                      env: Dict[str, str]) -> str:
    """``ray_preprocess.sbatch`` on ``nodes`` nodes (2 CPUs each), submitted from ``work`` with
    the relative ``--output dataset`` (it must land in the submit directory), output in
    ``work/job.out``; returns the job id."""
    res = slurm.sbatch([f"--nodes={nodes}", "--cpus-per-task=2", f"--output={work}/job.out",
                        str(RAY_SBATCH), *inputs.args, "--output", "dataset"],
                       wait=False, env=env, cwd=work)
    assert res.returncode == 0, res.stderr
    return job_id(res)


def job_port(job: str, offset: int) -> int:
    """The TCP port cluster/slurm/common.sh's ``vwlmm_job_port`` gives job ``job`` at
    ``offset`` (1: a preprocessing job's Ray GCS, 2: its dashboard)."""
    return 20000 + 10 * (int(job) % 1200) + offset


def wait_while_running(slurm, job: str, done: Callable[[], bool], what: str, out: Path,
                       timeout: float = 300) -> None:
    """Poll ``done()`` until it holds while the job runs. Fails, cancelling the job, when the
    job ends (is no longer pending or running) first or ``timeout`` s pass, with the tail of the
    job's output file ``out``; ``what`` names the awaited event in that message."""
    deadline = time.monotonic() + timeout
    with slurm.cancelled_unless_ended(job):
        while not done():
            state = slurm.job_field(job, "JobState")
            assert state in ("PENDING", "RUNNING"), \
                f"job {job} is {state or 'gone'} before {what}:\n{read(out)[-5000:]}"
            assert time.monotonic() < deadline, \
                f"no {what} within {timeout:.0f} s:\n{read(out)[-5000:]}"
            time.sleep(0.1)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def train_records(run_dir: Path) -> List[dict]:
    """The train records of metrics.jsonl in the order the trainer logged them (resumes append);
    [] before the first, and a line being written right now is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if rec.get("split") == "train":
            out.append(rec)
    return out


def train_iterations(run_dir: Path) -> List[int]:
    """Iterations in the order the trainer logged them to metrics.jsonl (resumes append)."""
    return [rec["iteration"] for rec in train_records(run_dir)]


def latest_checkpoint(run_dir: Path) -> str:
    marker = run_dir / "checkpoints/latest"
    return marker.read_text().strip() if marker.exists() else ""
