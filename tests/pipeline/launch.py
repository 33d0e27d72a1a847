"""Run the real trainer under torchrun (or as a bare process) and read back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megatron_vwlmm.parallel.launch import find_free_port
from tests.faults import env as fault_env

REPO = Path(__file__).resolve().parents[2]
BASE_SETS = [
    "logging.tensorboard=false", "train.eval_interval=0", "data.valid_fraction=0",
    "data.num_workers=1", "optim.warmup_iters=1",
]


def arrow_dataset(root: Path, n: int, seed: int, shard_size: int, **manifest) -> Path:
    """``n`` synthetic samples as Arrow shards under ``root`` (``manifest``: write_dataset's
    keyword arguments, e.g. ``tokenizer=``)."""
    from pipeline.data.synthetic import make_samples, write_dataset

    write_dataset(str(root), make_samples(n, seed=seed), shard_size=shard_size,
                  formats=("arrow",), **manifest)
    return Path(root)


def env(*faults: str) -> Dict[str, str]:
    """The trainer's environment; ``faults``: ``tests/faults.py`` hooks to install
    (``"kill_after_step=3"``)."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    if faults:
        e.update(fault_env(*faults))
    return e


def train_cmd(nproc: int, data: Path, run_dir: Path, sets: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={find_free_port()}", "-m", "pipeline.train",
           "--config", str(REPO / "configs/tiny-cpu.yaml")]
    for s in BASE_SETS + [f"data.path={data}", f"run_dir={run_dir}"] + sets:
        cmd += ["--set", s]
    return cmd


def train(nproc: int, data: Path, run_dir: Path, sets: List[str], expect_rc: Optional[int] = 0,
          timeout: float = 300, faults: Sequence[str] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(nproc, data, run_dir, sets), cwd=REPO, env=env(*faults),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"trainer exited {proc.returncode} (expected {expect_rc}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> Dict[int, Dict[str, float]]:
    """iteration -> record of the train split (a resumed run appends to the same file)."""
    out = {}
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == "train":
                out[r["iteration"]] = r
    return out


def checkpoint_tensors(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer), gathered in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(ckpt_dir).parent / (Path(ckpt_dir).name + ".pt")
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}
