"""The trainer refuses, in one line that names the cause and the fix, what would otherwise train
wrong or fail obscurely: ids outside the vocabulary, data of another tokenizer than the
checkpoint's, a checkpoint of another model shape or optimizer kind, a damaged checkpoint, a
hostile checkpoint index. Black box: the trainer under torchrun with ``--set`` values, and
``vwlmm-convert export``.

One short run (two checkpoints) serves every resume case; each case works on its own copy.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.synthetic import make_samples, write_dataset
from tests.pipeline.launch import REPO, arrow_dataset, env, train

pytestmark = pytest.mark.timeout(600)
SETS = ["parallel.tp=1", "data.format=arrow", "data.micro_batch_size=2",
        "data.global_batch_size=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    data = arrow_dataset(root / "data", 16, seed=5, shard_size=8)
    run_dir = root / "run"
    train(1, data, run_dir, SETS + ["train.train_iters=2", "checkpoint.save_interval=1"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["iter_0000001", "iter_0000002", "latest"]
    return root, data, run_dir


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir / "checkpoints", dest / "checkpoints")
    return dest


def _refused(data: Path, run_dir: Path, sets: list, nproc: int = 1) -> str:
    """The trainer exits 2 and says why in exactly one line of stderr (no traceback)."""
    proc = train(nproc, data, run_dir, SETS + ["train.train_iters=3"] + sets, expect_rc=None)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines()
             if line.startswith(("config error:", "error (rank"))]
    assert lines, proc.stderr[-4000:]
    assert "]: Traceback" not in proc.stderr, proc.stderr[-4000:]  # none from a trainer rank
    return lines[0]


def test_token_ids_outside_the_vocabulary_are_refused_at_tp2(tmp_path):
    """TP=2's vocab-parallel embedding would map id 40000 to a zero row and train on."""
    samples = make_samples(8, seed=1)
    for s in samples:
        s["input_ids"] = s["input_ids"].copy()
        s["input_ids"][2] = 40000
    data = tmp_path / "bad"
    write_dataset(str(data), samples, shard_size=8, formats=("arrow",))
    line = _refused(data, tmp_path / "run", ["parallel.tp=2", "data.micro_batch_size=4",
                                             "data.global_batch_size=4"], nproc=2)
    assert "outside the model's vocabulary [0, 32000)" in line and "40000" in line
    assert "shard-000000.arrow" in line and "test-0000" in line


def test_negative_label_ids_are_refused_naming_the_sample():
    from pipeline.data.decode import decode_sample
    from vwlmm_data.contract import VisionInfo
    from vwlmm_data.samples import BadSampleError

    raw = make_samples(1)[0]
    raw = {**raw, "labels": np.where(raw["labels"] == 2, -5, raw["labels"])}
    with pytest.raises(BadSampleError, match=r"sample 'test-00000' in shard-x row 0: labels "
                                             r"holds 1 id\(s\) outside"):
        decode_sample(raw, 32, "shard-x row 0", VisionInfo.of("clip"), vocab_size=32000)


def test_data_of_another_tokenizer_is_refused(run, tmp_path):
    root, _, run_dir = run
    other = arrow_dataset(tmp_path / "mistral-data", 16, seed=5, shard_size=8,
                          tokenizer="mistral-tokenizer")
    line = _refused(other, _copy(run_dir, tmp_path / "r"), [])
    assert "'test-tokenizer'" in line and "'mistral-tokenizer'" in line
    assert "--set data.allow_tokenizer_change=true" in line


def test_a_checkpoint_of_another_model_shape_is_refused_in_one_line(run, tmp_path):
    _, data, run_dir = run
    line = _refused(data, _copy(run_dir, tmp_path / "r"), ["model.decoder.num_layers=2"])
    assert "decoder.num_layers: run 2 vs checkpoint 4" in line


def test_a_checkpoint_of_the_other_optimizer_kind_is_refused(run, tmp_path):
    _, data, run_dir = run
    line = _refused(data, _copy(run_dir, tmp_path / "r"),
                    ["parallel.use_distributed_optimizer=false"])
    assert "--set parallel.use_distributed_optimizer=true" in line


def test_a_damaged_latest_checkpoint_is_named_with_the_setting_that_resumes(run, tmp_path):
    _, data, run_dir = run
    truncated = _copy(run_dir, tmp_path / "truncated")
    shard = sorted((truncated / "checkpoints/iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    line = _refused(data, truncated, [])
    assert "iter_0000002" in line and "--set checkpoint.resume_iteration=1" in line

    missing = _copy(run_dir, tmp_path / "missing")
    (missing / "checkpoints/iter_0000002/common.pt").unlink()
    line = _refused(data, missing, [])
    assert "iter_0000002 (iteration 2): incomplete, missing common.pt" in line
    assert "--set checkpoint.resume_iteration=1" in line
    # ... and that setting resumes from the previous checkpoint
    out = train(1, data, missing, SETS + ["train.train_iters=3",
                                          "checkpoint.resume_iteration=1"])
    assert "iter_0000001 at iteration 1" in out.stdout


class _Payload:
    """Unpickling this runs a shell command (what a hostile .metadata would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_a_hostile_checkpoint_index_runs_no_code(run, tmp_path):
    _, data, run_dir = run
    hostile = _copy(run_dir, tmp_path / "hostile")
    marker = tmp_path / "code-ran"
    folder = hostile / "checkpoints/iter_0000002"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))

    line = _refused(data, hostile, [])
    assert "refused global subprocess.call" in line and not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "megatron_vwlmm.convert.cli", "export",
                           "--checkpoint", str(folder), "--format", "llava-hf",
                           "--out", str(tmp_path / "hf")], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "refused global subprocess.call" in proc.stderr, \
        proc.stderr[-3000:]
    assert not marker.exists(), "unpickling the hostile .metadata ran its code"


def test_a_second_job_in_a_running_jobs_run_dir_is_refused(run, tmp_path):
    """A resubmitted job while the first still trains is refused, naming the first's host and
    PID; once the first is SIGKILLed, its lock is taken over by the next job."""
    import signal
    import socket
    import time

    from megatron_vwlmm.parallel.launch import find_free_port
    from tests.pipeline.launch import losses, train_cmd

    _, data, run_dir = run
    shared = _copy(run_dir, tmp_path / "shared")
    e = env()
    e.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(find_free_port()))
    cmd = train_cmd(1, data, shared, SETS + ["train.train_iters=100000",
                                             "checkpoint.save_interval=0"])
    cmd = [sys.executable] + cmd[cmd.index("-m", 3):]  # the bare trainer, as srun starts it
    first = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (shared / "metrics.jsonl").exists() or max(losses(shared), default=0) < 3:
            assert first.poll() is None and time.time() < deadline, "the first job did not train"
            time.sleep(0.2)
        line = _refused(data, shared, [])
        assert f"in use by vwlmm-train (host {socket.gethostname()}, PID {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (shared / ".vwlmm-lock").exists()  # what a killed job leaves
    out = train(1, data, shared, SETS + ["train.train_iters=3"])
    assert "iter_0000002 at iteration 2" in out.stdout
    assert not (shared / ".vwlmm-lock").exists()
