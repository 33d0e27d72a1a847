"""``vwlmm-eval`` with the real lmms-eval, on CPU, on a tiny run trained for the purpose.

One training launch (TP=2, three steps, a checkpoint after each) serves every check:

1. ``vwlmm-eval --watch`` on the run, SIGKILLed once the marker of its second evaluation is
   written (``tests/faults.py``: the ``eval.marked`` event), then restarted: each checkpoint is
   evaluated once (one lmms-eval results file and one marker per checkpoint, the restart runs
   lmms-eval once), and ``metrics.jsonl`` holds exactly one eval record per checkpoint, the
   killed one's published by the restart; TensorBoard has ``eval/<task>/exact_match``.
2. ``vwlmm-convert export`` of the last (TP=2) checkpoint, evaluated as an HF folder: the same
   answers as the watcher's on-the-fly export gave, item for item.
3. Scoring: lmms-eval's reported VQA accuracy equals the official computation
   (``vqa_reference.py``) of the answers it logged, for the task as written and for a copy
   whose annotator answers are built from the model's own answers (so that the normalisation
   decides non-zero scores: the random-weight model answers garbage).
4. ``--prefetch`` fills ``HF_HOME``; one-line refusals: a task whose dataset is not in
   ``HF_HOME`` offline, no isolated environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval import fixtures as fx
from tests.eval.vqa_reference import vqa_accuracy
from tests.pipeline.launch import REPO, env, train

pytestmark = pytest.mark.timeout(900)

ITERS = (1, 2, 3)
RUN_SETS = ["parallel.tp=2", "data.format=arrow", "data.micro_batch_size=2",
            "data.global_batch_size=4", "train.train_iters=3", "checkpoint.save_interval=1",
            "checkpoint.keep_last=3", "logging.tensorboard=true",
            # Barely moved from the random initialisation: garbage answers of several tokens
            # (a trained tiny model answers with </s> at once, i.e. empty strings).
            "optim.lr=1e-5", "optim.min_lr=0"]


VWLMM_EVAL = str(Path(sys.executable).with_name("vwlmm-eval"))  # the installed command


def _eval(args, faults=(), expect_rc=0, **variables) -> subprocess.CompletedProcess:
    """``vwlmm-eval ARGS`` as a user runs it: the installed command, no PYTHONPATH (but when a
    fault hook from ``tests/`` must load), from another folder."""
    environment = {**env(*faults), **variables}
    if not faults:
        environment.pop("PYTHONPATH", None)
    proc = subprocess.run([VWLMM_EVAL, *map(str, args)], cwd="/",
                          env=environment, capture_output=True, text=True, timeout=600)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"vwlmm-eval exited {proc.returncode} (expected {expect_rc}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _markers(run: Path, iteration: int):
    return sorted((run / "eval" / f"iter_{iteration:07d}").glob("evaluated-*.json"))


def _eval_records(run: Path):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "eval"]


def _samples(path: str):
    return sorted(map(json.loads, Path(path).read_text().splitlines()),
                  key=lambda s: s["doc_id"])


def _targeted_answers(model_answers):
    """Ten annotator answers per item: some copies of the model's answer, exact or in forms
    the VQA normalisation maps onto it, the rest the item's own answers."""
    out = []
    for i, (answer, (_, _, own)) in enumerate(zip(model_answers, fx.ITEMS)):
        variants = [answer.upper(), "The " + answer, answer + "."]
        mine = [answer] * (i % 4) + variants[:i % 3]
        out.append(mine + own[:10 - len(mine)])
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, eval_python):
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    root = tmp_path_factory.mktemp("vwlmm_eval")
    data = fx.write_run_data(root / "data", build_mistral_hf_tokenizer(root / "tokenizer"))
    run = root / "run"
    train(2, data, run, RUN_SETS)
    images = fx.write_images(root / "images")
    task = fx.write_task(root / "task", images, [a for _, _, a in fx.ITEMS])
    watch = ["--watch", run, "--tasks", fx.TASK, "--include-path", task, "--poll", "1"]
    out = {"run": run, "task": task}
    out["killed"] = _eval(watch, faults=["kill_after_eval_marker=2"], expect_rc=None)
    out["after_kill"] = {i: len(_markers(run, i)) for i in ITERS}
    out["records_after_kill"] = _eval_records(run)
    out["resumed"] = _eval(watch)

    hf = root / "hf"
    subprocess.run([sys.executable, "-m", "megatron_vwlmm.convert.cli", "export", "--checkpoint",
                    str(run / "checkpoints" / "iter_0000003"), "--out", str(hf)],
                   cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    last = json.loads(_markers(run, 3)[0].read_text())
    answers = [s["filtered_resps"] for s in _samples(last["samples_files"][fx.TASK])]
    targeted = fx.write_task(root / "targeted", images, _targeted_answers(answers),
                             task=fx.TASK + "_targeted")
    out["targeted"] = targeted
    out["hf_out"] = root / "hf_eval"
    out["hf"] = _eval([hf, "--tasks", fx.TASK + "_targeted", "--include-path", targeted,
                       "--output", out["hf_out"]])
    out["hf_dir"] = hf
    return out


def test_watch_evaluates_each_checkpoint_once_across_a_kill(evaluated):
    run = evaluated["run"]
    killed, resumed = evaluated["killed"], evaluated["resumed"]
    assert killed.returncode == -9, killed.stderr[-3000:]
    # Killed right after the second marker: two markers, the second one's record unpublished.
    assert evaluated["after_kill"] == {1: 1, 2: 1, 3: 0}
    assert [r["iteration"] for r in evaluated["records_after_kill"]] == [1]
    # The restart evaluated only the third checkpoint and published the second's record.
    assert resumed.stdout.count("[vwlmm-eval] lmms-eval: ") == 1
    assert "iter_0000003" in resumed.stdout and "finished at iteration 3" in resumed.stdout
    records = _eval_records(run)
    assert sorted(r["iteration"] for r in records) == list(ITERS)
    assert {r["task"] for r in records} == {fx.TASK}
    for i in ITERS:
        markers = _markers(run, i)
        assert len(markers) == 1
        marker = json.loads(markers[0].read_text())
        assert marker["iteration"] == i and marker["checkpoint"] == f"iter_{i:07d}"
        (record,) = [r for r in records if r["iteration"] == i]
        assert record["evaluation"] == marker["id"]
        assert record["exact_match"] == marker["metrics"][fx.TASK]["exact_match"]
        results = list((run / "eval" / f"iter_{i:07d}").rglob("*_results.json"))
        assert results == [Path(marker["results_file"])]
        samples = Path(marker["samples_files"][fx.TASK])
        assert samples.parent == results[0].parent
        assert len(samples.read_text().splitlines()) == len(fx.ITEMS)


def test_eval_scores_reach_tensorboard_and_the_plot(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.metrics import read_metrics
    from pipeline.plot import benchmark_curves, plot

    run = evaluated["run"]
    tag = f"eval/{fx.TASK}/exact_match"
    steps = {}
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps.update({e.step: e.value for e in acc.Scalars(tag)})
    records = {r["iteration"]: r["exact_match"] for r in _eval_records(run)}
    assert sorted(steps) == list(ITERS)
    assert all(steps[i] == pytest.approx(records[i]) for i in ITERS)
    curves = benchmark_curves(read_metrics(run))
    assert curves == {f"{fx.TASK}/exact_match": [(i, records[i]) for i in ITERS]}
    assert plot(run, run / "loss.png").stat().st_size > 0


def test_checkpoint_and_hf_export_give_the_same_answers(evaluated):
    run = evaluated["run"]
    marker = json.loads(_markers(run, 3)[0].read_text())
    from_checkpoint = _samples(marker["samples_files"][fx.TASK])
    (hf_samples,) = evaluated["hf_out"].rglob(f"*_samples_{fx.TASK}_targeted.jsonl")
    from_hf = _samples(str(hf_samples))
    assert [s["input"] for s in from_hf] == [s["input"] for s in from_checkpoint]
    answers = [s["filtered_resps"] for s in from_checkpoint]
    assert [s["filtered_resps"] for s in from_hf] == answers
    # Greedy decoding of up to 4 tokens: non-empty text, not the same for every image.
    assert all(a.strip() for a in answers) and len(set(answers)) > 1


@pytest.mark.parametrize("which", ["as_written", "targeted"])
def test_reported_accuracy_is_the_official_vqa_accuracy_of_the_logged_answers(evaluated,
                                                                              which):
    if which == "as_written":
        marker = json.loads(_markers(evaluated["run"], 3)[0].read_text())
        task, folder = fx.TASK, evaluated["task"]
        results_file, samples_file = marker["results_file"], marker["samples_files"][task]
    else:
        task, folder = fx.TASK + "_targeted", evaluated["targeted"]
        (results_file,) = evaluated["hf_out"].rglob("*_results.json")
        (samples_file,) = evaluated["hf_out"].rglob(f"*_samples_{task}.jsonl")
    reported = json.loads(Path(results_file).read_text())["results"][task]["exact_match,none"]
    dataset = {d["question_id"]: d for d in fx.read_dataset(folder)}
    samples = _samples(str(samples_file))
    assert len(samples) == len(dataset)
    per_item = []
    for s in samples:
        doc = dataset[s["doc_id"]]
        mine = vqa_accuracy(s["filtered_resps"], [a["answer"] for a in doc["answers"]])
        assert s["exact_match"] == pytest.approx(mine, abs=1e-12), (s, doc)
        per_item.append(mine)
    assert reported == pytest.approx(sum(per_item) / len(per_item), abs=1e-12)
    if which == "targeted":  # the normalisation decided real, varied scores
        assert reported > 0 and len(set(per_item)) >= 4


def test_missing_dataset_offline_is_one_line_naming_task_and_dataset(evaluated, tmp_path):
    folder = fx.write_hub_task(tmp_path / "absent", "vwlmm_absent_vqa", "vwlmm-tests/absent-vqa")
    proc = _eval([evaluated["hf_dir"], "--tasks", "vwlmm_absent_vqa", "--include-path", folder,
                  "--output", tmp_path / "out"], expect_rc=2)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("vwlmm-eval: error: task vwlmm_absent_vqa: dataset "
                           "vwlmm-tests/absent-vqa could not be loaded")
    assert "HF_DATASETS_OFFLINE=1" in line and os.environ["HF_HOME"] in line
    assert "Traceback" not in proc.stderr


def test_prefetch_loads_the_tasks_datasets_into_hf_home(evaluated, tmp_path):
    home = tmp_path / "hf_home"
    proc = _eval(["--prefetch", "--tasks", fx.TASK, "--include-path", evaluated["task"]],
                 HF_HOME=str(home))
    assert f"the datasets of {fx.TASK} are in HF_HOME={home}" in proc.stdout
    assert list((home / "datasets").rglob("*.arrow"))  # the dataset's cache, where runs read it


def test_missing_eval_env_is_one_line_naming_the_install(tmp_path):
    proc = _eval([tmp_path, "--tasks", fx.TASK, "--output", tmp_path / "out"], expect_rc=2,
                 VWLMM_EVAL_ENV=str(tmp_path / "no-env"))
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "make eval-env" in proc.stderr and str(tmp_path / "no-env") in proc.stderr
    assert not (tmp_path / "out").exists()
