"""Resume at every layout, black box: the trainer as users launch it (torchrun + ``--set``).

For each save layout (TP=2, PP=2 with and without the distributed optimizer, TP=2 x PP=2 with
sequence parallelism on 4 ranks, DP=2, PP=2 with VPP=2), at the tiny preset's shapes (its real 32000-piece vocabulary),
every run starting from the same weights (``model.init_from`` of one checkpoint):

1. ``train_iters=4, save_interval=2`` SIGKILLed after iteration 3 (checkpoint 2 on disk);
2. the same command extended to ``train_iters=6``: resumes from 2 and runs 3..6. Iteration 3 is
   bit-identical to the killed launch's own iteration 3 (a); iterations 1..6 equal a one-process
   reference run from the same weights within 1e-5, VM loss > 0 (b);
3. a copy of the layout's iteration-4 checkpoint resumed at another layout (``CROSS``) to 6:
   iterations 5..6 equal the reference within 1e-5 (c). The optimizer kind is kept: megatron
   cannot load a distributed optimizer's state into the plain one (the trainer refuses that
   resume by name, ``tests/pipeline/test_refusals.py``).

A constant learning rate keeps the schedule independent of ``train_iters``, so the killed run,
its extension and the reference follow one trajectory; a moderate one (1e-3) keeps the layouts'
float32 rounding differences from growing past the tolerance over six steps. Each launch serves several assertions;
all of them run once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

from tests.pipeline.launch import arrow_dataset, train

pytestmark = pytest.mark.timeout(1500)

LAYOUTS = {  # name -> (processes, --set values)
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_no_distopt": (2, ["parallel.pp=2", "parallel.use_distributed_optimizer=false"]),
    "tp2_pp2_sp": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    "dp2": (2, []),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
}
ORDER = list(LAYOUTS)
CROSS = {  # save layout -> the layout its iteration-4 checkpoint is resumed at
    "tp2": "pp2", "pp2": "tp2_pp2_sp", "tp2_pp2_sp": "dp2", "dp2": "pp2_vpp2", "pp2_vpp2": "tp2",
    "pp2_no_distopt": "tp2_no_distopt",
}
CROSS_LAYOUTS = {**LAYOUTS, "tp2_no_distopt": (2, ["parallel.tp=2",
                                                   "parallel.use_distributed_optimizer=false"])}
SETS = ["parallel.tp=1", "data.format=arrow", "data.micro_batch_size=2",
        "data.global_batch_size=8", "optim.decay_style=constant", "optim.lr=1e-3",
        "optim.min_lr=0",
        "checkpoint.keep_last=5"]
TOL = 1e-5


def _records(run_dir: Path) -> List[Dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    data = arrow_dataset(root / "data", 40, seed=7, shard_size=10)
    init = root / "init"
    train(1, data, init, SETS + ["train.train_iters=1"])
    start = SETS + [f"model.init_from={init / 'checkpoints'}"]
    reference = root / "reference"
    train(1, data, reference, start + ["train.train_iters=6"])
    runs = {}
    for name in ORDER:
        nproc, layout = LAYOUTS[name]
        run = root / name
        killed = train(nproc, data, run, start + layout + [
            "train.train_iters=4", "checkpoint.save_interval=2"],
            expect_rc=None, faults=["kill_after_step=3"])
        assert killed.returncode != 0 and \
            f"saved checkpoint {run / 'checkpoints' / 'iter_0000002'}" in killed.stdout, \
            f"{name}: the run did not save and die as injected:\n{killed.stdout[-3000:]}" \
            f"\n{killed.stderr[-3000:]}"
        out = train(nproc, data, run, start + layout + [
            "train.train_iters=6", "checkpoint.save_interval=2"])
        assert f"resumed from {run / 'checkpoints' / 'iter_0000002'}" in out.stdout, out.stdout
        runs[name] = run
    crossed = {}
    for name in ORDER:
        target = CROSS[name]
        nproc, layout = CROSS_LAYOUTS[target]
        run = root / f"{name}_into_{target}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(runs[name] / "checkpoints/iter_0000004",
                        run / "checkpoints/iter_0000004")
        (run / "checkpoints/latest").write_text("iter_0000004\n")
        out = train(nproc, data, run, SETS + layout + ["train.train_iters=6"])
        assert "resumed from" in out.stdout and "iteration 4" in out.stdout, out.stdout
        crossed[name] = run
    return {"reference": _records(reference), "runs": runs, "crossed": crossed}


def _by_iteration(records: List[Dict]) -> Dict[int, Dict]:
    return {r["iteration"]: r for r in records}  # the last record of an iteration wins


def _assert_close(got: Dict[int, Dict], ref: Dict[int, Dict], iterations, what: str) -> None:
    for it in iterations:
        for key in ("lm_loss", "vm_loss"):
            assert abs(got[it][key] - ref[it][key]) <= TOL, \
                f"{what} iteration {it} {key}: {got[it][key]} vs reference {ref[it][key]}"
        assert got[it]["vm_loss"] > 0, f"{what} iteration {it}: vm_loss is 0 (a zeroed VM head)"


@pytest.mark.parametrize("name", ORDER)
def test_kill_and_extend(matrix, name):
    records = _records(matrix["runs"][name])
    third = [r for r in records if r["iteration"] == 3]
    assert len(third) == 2, f"{name}: iteration 3 should be logged by both launches"
    for key in ("lm_loss", "vm_loss", "grad_norm"):
        assert third[0][key] == third[1][key], \
            f"{name}: iteration 3 {key} after resume {third[1][key]} != {third[0][key]}"
    got, ref = _by_iteration(records), _by_iteration(matrix["reference"])
    assert sorted(got) == list(range(1, 7))
    _assert_close(got, ref, range(1, 7), name)
    assert ref[6]["lm_loss"] < ref[1]["lm_loss"] - 0.01, "training did not move the weights"


@pytest.mark.parametrize("name", ORDER)
def test_resume_into_next_layout(matrix, name):
    got = _by_iteration(_records(matrix["crossed"][name]))
    assert sorted(got) == [5, 6]
    _assert_close(got, _by_iteration(matrix["reference"]), (5, 6), f"{name} into {CROSS[name]}")
