"""What the cluster tests need besides the local Slurm: module checks, job output, run state."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "cluster/slurm/train.sbatch"
RAY_SBATCH = REPO / "cluster/slurm/ray_preprocess.sbatch"


def require_module(name: str, what: str) -> None:
    """Skip (with the reason) until another part of the project has landed."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{what}: module `{name}` is not in the tree yet")


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


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def train_iterations(run_dir: Path) -> List[int]:
    """Iterations in the order the trainer logged them to metrics.jsonl (resumes append)."""
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
            out.append(rec["iteration"])
    return out


def latest_checkpoint(run_dir: Path) -> str:
    marker = run_dir / "checkpoints/latest"
    return marker.read_text().strip() if marker.exists() else ""
