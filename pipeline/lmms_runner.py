"""Run lmms-eval on an HF llava folder: the part of ``vwlmm-eval`` that runs in the isolated env.

Executed by the isolated environment's python (``pipeline/eval_env.py``) as a script, with
``python -P`` so that this folder does not shadow installed packages (``evaluate.py`` here,
HF's ``evaluate`` there). It imports only the standard library and lmms-eval, and does what
lmms-eval's own command line does for ``--model llava_hf --log_samples --output_path``: tasks
found through a ``TaskManager`` (with the user's ``--include-path``), ``simple_evaluate``, then
the harness's results JSON and per-sample logs written by its ``EvaluationTracker``. It adds
one file for the caller, ``--summary``: where those files are and the per-task results.
``--prefetch`` only loads the tasks (their datasets land in ``HF_HOME``), for offline use.

Each task is loaded once before the model (``check_tasks``), so a task whose dataset cannot be
loaded (e.g. missing from ``HF_HOME`` under ``HF_DATASETS_OFFLINE=1``) or an unknown task ends
the run at once: exit status 2 with one line on stderr naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MODEL = "llava_hf"


def _fail(message: str) -> None:
    print(f"vwlmm-eval: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _dataset_of(task_manager, name: str) -> str:
    from lmms_eval import utils

    entry = task_manager.task_index.get(name, {})
    path = entry.get("yaml_path", -1)
    if path == -1:
        return "?"
    config = utils.load_yaml_config(path, mode="full")
    dataset = config.get("dataset_path", "?")
    return f"{dataset} ({config['dataset_name']})" if config.get("dataset_name") else dataset


def check_tasks(task_manager, names, task_type: str) -> None:
    """Load each task (its dataset) before the model: a task whose data cannot be loaded is
    said in one line, naming it and its dataset, before any time is spent on the model."""
    for name in names:
        try:
            task_manager.load_task_or_group([name], task_type)
        except Exception as exc:  # datasets raises many kinds for a missing or bad dataset
            if getattr(exc, "last_attempt", None) is not None:  # lmms-eval's retries (tenacity)
                exc = exc.last_attempt.exception() or exc
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or \
                os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = (f"with HF_DATASETS_OFFLINE=1 it must already be in HF_HOME="
                    f"{os.environ.get('HF_HOME', '~/.cache/huggingface')} (fetch it with "
                    "`vwlmm-eval --prefetch`; docs/EVALUATION.md, 'Offline')") \
                if offline else "check the dataset id and access"
            _fail(f"task {name}: dataset {_dataset_of(task_manager, name)} could not be loaded "
                  f"({type(exc).__name__}: {last}); {hint}")


def run(args: argparse.Namespace) -> dict:
    from lmms_eval import evaluator, utils
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    task_manager = TaskManager("INFO", include_path=args.include_path or None, model_name=MODEL)
    requested = [t for t in args.tasks.split(",") if t]
    names = task_manager.match_tasks(requested)
    unknown = [t for t in requested if t not in names and "*" not in t]
    if unknown:
        where = f" (searched lmms-eval's tasks and {', '.join(args.include_path)})" \
            if args.include_path else " (add your own task folders with --include-path)"
        _fail(f"unknown task(s) {', '.join(unknown)}{where}")
    check_tasks(task_manager, names, "simple" if get_model(MODEL).is_simple else "chat")
    if args.prefetch:
        return {"prefetched": names}
    tracker = EvaluationTracker(output_path=str(args.output))
    datetime_str = utils.get_datetime_str()
    # device_map: transformers refuses llava_hf's default ("").
    results = evaluator.simple_evaluate(
        model=MODEL, model_args=f"pretrained={args.model},device_map={args.device}",
        tasks=names, batch_size=args.batch_size, device=args.device, limit=args.limit,
        log_samples=True, evaluation_tracker=tracker, task_manager=task_manager,
        datetime_str=datetime_str)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    folder = Path(args.output) / tracker.general_config_tracker.model_name_sanitized
    return {
        "results_file": str(folder / f"{tracker.date_id}_results.json"),
        "samples_files": {task: str(folder / f"{tracker.date_id}_samples_{task}.jsonl")
                          for task in results["configs"]},
        "results": results["results"],
        "n_samples": results.get("n-samples", {}),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF llava folder")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--output", type=Path)
    p.add_argument("--prefetch", action="store_true",
                   help="only load the tasks' datasets (into HF_HOME), no model")
    p.add_argument("--summary", required=True, type=Path)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", default="1")
    p.add_argument("--include-path", action="append", default=[])
    args = p.parse_args(argv)
    if not args.prefetch and (args.model is None or args.output is None):
        p.error("--model and --output are required to evaluate")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    summary = run(args)
    args.summary.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
