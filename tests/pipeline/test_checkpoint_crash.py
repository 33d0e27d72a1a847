"""A kill -9 during checkpoint save and prune never leaves a run without a loadable `latest`.

``tests/pipeline/checkpoint_saver.py`` runs the save protocol of
``megatron_vwlmm/checkpoint/layout.py`` on real torch_dist checkpoints (tensor values = the
iteration) and is SIGKILLed at every named step of every save, and after random delays; after
each kill `latest` must load (through the converter's reader as well) with the content of the
iteration it names, and a rerun must finish with exactly the expected folders. Also the
pruning policy: another run's and unmarked checkpoints are never deleted.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vwlmm.checkpoint.layout import (
    LATEST,
    Marker,
    checkpoint_name,
    iteration_of,
    latest_checkpoint,
    list_checkpoints,
    recover,
)
from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.pipeline.launch import REPO, env

STEPS = ("staged", "written", "synced", "displaced", "renamed", "latest", "discarded",
         "pruning", "pruned")
TEMPLATES = 9


def _write_templates(root: str, count: int, config: dict) -> None:
    """One real torch_dist checkpoint per iteration 1..count (tensor and common state = it)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for it in range(1, count + 1):
        folder = Path(root) / checkpoint_name(it)
        folder.mkdir(parents=True)
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.full((4,), float(it))),
                 "iteration": it, "vwlmm_config": config}
        dist_checkpointing.save(state, str(folder), sharded_strategy=("torch_dist", 1))


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    from megatron_vwlmm.checkpoint.metadata import config_to_dict
    from megatron_vwlmm.model import get_preset

    root = tmp_path_factory.mktemp("templates")
    config = config_to_dict(get_preset("tiny"))
    run_on_ranks(_write_templates, 1, args=(str(root), TEMPLATES, config))
    return root


def _save(root: Path, templates: Path, run_id: str, iterations, keep_last: int = 2,
          kill_at: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.pipeline.checkpoint_saver", str(root), str(templates),
           "--run-id", run_id, "--iterations", ",".join(map(str, iterations)),
           "--keep-last", str(keep_last)] + (["--kill-at", kill_at] if kill_at else [])
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)


def assert_latest_loads(root: Path, scratch: Path) -> int:
    """`latest` names a complete checkpoint holding the iteration its name says (read with
    torch's reader and through the converter's); returns that iteration."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_vwlmm.convert.megatron_io import resolve_checkpoint

    path = latest_checkpoint(root)
    assert path is not None, f"{root}: no `latest`"
    it = iteration_of(path.name.split(".")[0])
    assert resolve_checkpoint(root).path == path
    assert dist_checkpointing.load_common_state_dict(str(path))["iteration"] == it
    dcp_to_torch_save(str(path), str(scratch))
    assert torch.equal(torch.load(scratch, weights_only=True)["w"], torch.full((4,), float(it)))
    scratch.unlink()
    return it


def _populate(root: Path, templates: Path) -> None:
    """Another run "A" (iterations 2, 6, 9; `latest` -> iter_0000002) and an unmarked iter_0000001
    (a checkpoint vwlmm did not mark: never deleted)."""
    root.mkdir(parents=True)
    for it in (1, 2, 6, 9):
        shutil.copytree(templates / checkpoint_name(it), root / checkpoint_name(it))
        if it != 1:
            Marker("A", it).write(root / checkpoint_name(it))
    (root / LATEST).write_text("iter_0000002\n")


RUN_B = (2, 4, 6, 8)  # replaces A's latest (2), a non-latest of A (6); A's 9 is above


def _final_state(root: Path) -> dict:
    return {p.name: (Marker.read(p).run_id if Marker.read(p) else None)
            for p in sorted(root.iterdir()) if p.name != LATEST}


EXPECTED_FINAL = {"iter_0000001": None, "iter_0000006": "B", "iter_0000008": "B",
                  "iter_0000009": "A"}


def test_kill_at_every_step_of_save_and_prune(templates, tmp_path):
    """Every step of run B's first save (it replaces the checkpoint `latest` names) and of its
    third (it replaces another of A's and prunes B's first): after the kill `latest` loads and
    is the previous or the new checkpoint; the rerun of the remaining saves ends in the
    expected folders (B's newest two, A's higher one, the unmarked one), nothing left over."""
    fired = 0
    for save in (0, 2):
        for step in STEPS:
            root = tmp_path / f"s{save}_{step}"
            _populate(root, templates)
            # the saves before the killed one, then the killed one
            proc = _save(root, templates, "B", RUN_B[:save + 1], kill_at=f"{save}:{step}")
            if proc.returncode == 0:
                continue  # this save never reaches that step (nothing displaced or pruned)
            assert proc.returncode == -9, proc.stderr[-2000:]
            fired += 1
            before = 2 if save == 0 else RUN_B[save - 1]
            it = assert_latest_loads(root, tmp_path / "scratch.pt")
            assert it in (before, RUN_B[save]), (save, step, it)
            if STEPS.index(step) >= STEPS.index("latest"):
                assert it == RUN_B[save], (save, step, it)
            rerun = _save(root, templates, "B", RUN_B[save:])
            assert rerun.returncode == 0, rerun.stderr[-2000:]
            assert assert_latest_loads(root, tmp_path / "scratch.pt") == 8
            assert _final_state(root) == EXPECTED_FINAL, (save, step)
    assert fired == 8 + 9, fired  # the first save prunes nothing, the third reaches all


def test_random_kills_during_repeated_saves(templates, tmp_path):
    """Three seeds: a run saving iterations 1..9 (keep_last=2) is killed at random steps of its
    saves and restarted from its `latest` until it finishes; after every kill and `recover`
    (what the trainer runs first) `latest` loads, and never goes backwards.

    The saver stops at each step until told to go on (``--step-by-step``), so each kill lands
    exactly at the step the seed chose, whatever the machine's load."""
    kills = 0
    for seed in range(3):
        rng = random.Random(seed)
        root = tmp_path / f"seed{seed}"
        done = 0
        for _ in range(40):
            # A run killed after its last save committed but before it pruned saves that
            # iteration again (replacing it, then pruning), as a rerun of the trainer would.
            first = min(done + 1, TEMPLATES)
            cmd = [sys.executable, "-m", "tests.pipeline.checkpoint_saver", str(root),
                   str(templates), "--run-id", "R", "--step-by-step", "--iterations",
                   ",".join(map(str, range(first, TEMPLATES + 1)))]
            proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            kill_at = rng.randint(1, 12)  # a step of the first two remaining saves, or later
            seen = 0
            for line in proc.stdout:
                if not line.startswith("step "):
                    continue
                seen += 1
                if seen == kill_at:
                    proc.kill()
                    break
                proc.stdin.write("\n")
                proc.stdin.flush()
            rc = proc.wait(timeout=120)
            kills += rc == -9
            if rc not in (0, -9):
                raise AssertionError(proc.stderr.read()[-2000:])
            recover(root)
            if list_checkpoints(root):
                it = assert_latest_loads(root, tmp_path / "scratch.pt")
                assert it >= done, (seed, it, done)
                done = it
            if done == TEMPLATES and rc == 0:
                break
        assert done == TEMPLATES and rc == 0, (seed, done)
        assert [p.name for p in list_checkpoints(root)] == ["iter_0000008", "iter_0000009"]
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000008", "iter_0000009", LATEST]
    assert kills >= 10, kills


def test_recover_and_prune_delete_only_marked_folders(templates, tmp_path):
    root = tmp_path / "root"
    _populate(root, templates)
    (root / "iter_0000003.tmp").mkdir()  # a user's (or another tool's) folder of that name
    (root / "iter_0000003.tmp" / "notes.txt").write_text("mine")
    (root / "iter_0000004.tmp").mkdir()  # an empty leftover
    notes = recover(root)
    assert (root / "iter_0000003.tmp" / "notes.txt").read_text() == "mine"
    assert any("iter_0000003.tmp" in n for n in notes)
    assert not (root / "iter_0000004.tmp").exists()
    assert _save(root, templates, "B", [3]).returncode != 0  # refuses the unmarked .tmp
    shutil.rmtree(root / "iter_0000003.tmp")
    # a run that would replace an unmarked checkpoint is refused; its save stays staged
    proc = _save(root, templates, "B", [1])
    assert proc.returncode != 0 and "not written by vwlmm" in proc.stderr
    assert (root / "iter_0000001.tmp").is_dir() and Marker.read(root / "iter_0000001") is None
    assert _save(root, templates, "B", [5, 7], keep_last=1).returncode == 0
    assert _final_state(root) == {"iter_0000001": None, "iter_0000002": "A",
                                  "iter_0000006": "A", "iter_0000007": "B",
                                  "iter_0000009": "A"}
    assert latest_checkpoint(root).name == "iter_0000007"


def test_resume_plan_refuses_a_folder_without_latest(tmp_path, capsys):
    from pipeline.checkpoint import CheckpointManager, plan_resume
    from pipeline.config import ConfigError

    assert plan_resume(tmp_path / "new", auto_resume=True) is None
    root = tmp_path / "ck"
    for it in (2, 4):
        (root / checkpoint_name(it)).mkdir(parents=True)
    with pytest.raises(ConfigError, match="no `latest` naming the one to resume.*auto_resume=false"):
        plan_resume(root, auto_resume=True)
    assert plan_resume(root, auto_resume=False) is None
    # The trainer's resume point says so (once, on rank 0).
    assert CheckpointManager(root, 2, {}).resume_point(auto_resume=False) is None
    assert "never prunes them" in capsys.readouterr().out
    (root / LATEST).write_text("iter_0000002\n")
    assert plan_resume(root, auto_resume=True) == root / "iter_0000002"
