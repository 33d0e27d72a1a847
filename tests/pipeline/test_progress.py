"""What a user sees of a run: the progress line (``iter 2/3 (67%) | s/it | elapsed | ETA``), the
closing summary, strict-JSON metrics that mark a resume, and the same scalars in TensorBoard and
in a Weights & Biases offline run. One launch and its extension serve every assertion.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.pipeline.launch import arrow_dataset, train
from tests.pipeline.wandb_records import history

pytestmark = pytest.mark.timeout(600)
SETS = ["parallel.tp=1", "data.format=arrow", "data.micro_batch_size=2",
        "data.global_batch_size=4", "logging.tensorboard=true", "logging.wandb_project=vwlmm-test",
        "logging.wandb_mode=offline", "data.valid_fraction=0.25", "train.eval_interval=3"]
LINE = re.compile(r"\[train\] iter (\d+)/(\d+) \((\d+)%\) \| (\d+\.\d\d) s/it \| "
                  r"elapsed (\d+:\d\d:\d\d) \| ETA (\d+:\d\d:\d\d) \| lm_loss \d+\.\d+")


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    arrow_dataset(root / "data", 24, seed=2, shard_size=12)
    first = train(1, root / "data", root / "run", SETS + ["train.train_iters=3"])
    extended = train(1, root / "data", root / "run", SETS + ["train.train_iters=4"])
    return root / "run", first.stdout, extended.stdout


def test_progress_line_and_summary(run):
    _, out, extended = run
    found = [LINE.search(line) for line in out.splitlines() if line.startswith("[train]")]
    assert [m and (int(m[1]), int(m[2]), int(m[3])) for m in found] == \
        [(1, 3, 33), (2, 3, 67), (3, 3, 100)], out
    assert found[-1][6] == "0:00:00" and float(found[0][4]) > 0
    assert re.search(r"summary: 3 iterations in \d+:\d\d:\d\d: 12 samples, \d+ tokens "
                     r"\(useful\), [\d.]+ samples/s, \d+ tokens/s", out), out
    assert "iter 4/4 (100%)" in extended and "summary: 1 iterations" in extended


def test_metrics_are_strict_json_and_mark_the_resume(run):
    run_dir, _, _ = run
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all(r["mfu"] is None for r in train)  # no peak FLOP/s given: null, never NaN
    splits = [(r["split"], r["iteration"]) for r in records]
    assert splits.index(("resume", 3)) == splits.index(("train", 4)) - 1
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert {r["iteration"] for r in records if r["split"] == "valid"} == {3}


def test_wandb_offline_run_holds_the_tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = run
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per launch
    logged = {}
    for f in files:
        logged.update(history(f))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.split("/")[1] in
            ("lm_loss", "vm_loss", "grad_norm", "lr", "valid_lm_loss")]
    assert {"train/lm_loss", "train/vm_loss", "valid/valid_lm_loss"} <= set(tags)
    for tag in tags:
        for event in events.Scalars(tag):
            assert logged[event.step][tag] == pytest.approx(event.value, rel=1e-6), \
                (tag, event.step)
