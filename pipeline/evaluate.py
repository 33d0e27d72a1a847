"""``vwlmm-eval``: benchmark a model with lmms-eval: an HF folder, a checkpoint, or a whole run.

What PATH designates (``resolve``): an HF llava folder (``vwlmm-convert export``), a megatron
checkpoint folder of any TP/PP layout, a checkpoint root or a run folder (their ``latest``).
A checkpoint is exported to a temporary llava-hf folder first (the exporter takes the tokenizer
and chat template of the run's data, ``megatron_vwlmm/convert/exporter.py``).

lmms-eval runs in its own environment (``pipeline/eval_env.py``), as a subprocess executing
``pipeline/lmms_runner.py``: model ``llava_hf``, the user's tasks, lmms-eval's own results JSON
and per-sample logs under the output folder, ``<run_dir>/eval/iter_NNNNNNN/`` by default. Its
scores come back here, where the run's side is written:

- the marker ``evaluated-<request>.json`` in the output folder (written atomically, fsync'd):
  the evaluation's id, where lmms-eval's files are and the scores. ``<request>`` is a digest of
  the tasks, the limit and the task folders, so another set of tasks is another evaluation;
- one ``{"split": "eval", "iteration": N, "task": T, ...}`` record per task in the run's
  ``metrics.jsonl`` and TensorBoard scalars ``eval/<task>/<metric>`` (``pipeline/metrics.py``),
  each carrying the evaluation's id. Publishing skips records already in the file, so it is
  repeated safely after a crash between the marker and the records.

``--watch RUN_DIR`` evaluates every committed checkpoint of the run that has no marker (saves
in progress are ``*.tmp`` folders, never listed), publishes the records of marked ones, and
stops once the run is finished: its latest checkpoint is at ``train.train_iters`` of the run's
``config.json``, which every launch rewrites (a resume that extends the run is waited for).
A killed watcher, restarted, goes on where it was: marked checkpoints are never evaluated again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from megatron_vwlmm.checkpoint import layout
from pipeline import eval_env
from vwlmm_data import hooks
from vwlmm_data.errors import Refusal

RUNNER = Path(__file__).with_name("lmms_runner.py")
EVAL_FOLDER = "eval"
MARKER_PREFIX = "evaluated-"
_MARKER_FORMAT = "vwlmm-eval/1"
_ERROR_PREFIX = b"vwlmm-eval: error: "
DTYPES = ("fp32", "bf16", "fp16")

EPILOG = """examples:
  vwlmm-eval runs/x --tasks mme,pope                       # the run's latest checkpoint
  vwlmm-eval runs/x/checkpoints/iter_0002000 --tasks mme --limit 50
  vwlmm-eval hf/x --tasks my_vqa --include-path my_tasks/ --output results/x
  vwlmm-eval --watch runs/x --tasks mme                    # every checkpoint the run writes
  vwlmm-eval --prefetch --tasks mme,pope                   # datasets into HF_HOME, for offline

lmms-eval runs in its own venv (build/eval-env): create it once with `make eval-env`.
Offline (HF_DATASETS_OFFLINE=1): fetch the tasks' datasets into HF_HOME first (README).
"""


class EvalError(Refusal):
    """An evaluation that cannot go on; the message says why and what to do."""


def say(message: str) -> None:
    print(f"[vwlmm-eval] {message}", flush=True)


@dataclass(frozen=True)
class Request:
    """What to evaluate with; ``digest`` identifies the evaluation (the device, batch size and
    export dtype change how, not what)."""

    tasks: Tuple[str, ...]
    limit: Optional[float] = None
    include_paths: Tuple[str, ...] = ()
    device: str = "cpu"
    batch_size: str = "1"
    dtype: str = "fp32"
    paper_table: bool = False  # --tasks named vwlmm-paper: write the comparison with the paper

    def digest(self) -> str:
        what = {"tasks": sorted(self.tasks), "limit": self.limit,
                "include_paths": sorted(self.include_paths)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]

    def marker_name(self) -> str:
        return f"{MARKER_PREFIX}{self.digest()}.json"


@dataclass(frozen=True)
class Target:
    """What PATH designates: an HF folder, or a checkpoint and the run it belongs to."""

    hf_dir: Optional[Path] = None
    checkpoint: Optional[Path] = None
    run_dir: Optional[Path] = None


# -- finding what to evaluate --------------------------------------------------------------------

def _hf_llava(folder: Path) -> bool:
    """Whether ``folder`` is an HF llava folder (refused when it is a llava layout lmms-eval's
    ``llava_hf`` cannot load)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("model_type") != "llava":
        return False
    architectures = config.get("architectures") or ["LlavaForConditionalGeneration"]
    if "LlavaForConditionalGeneration" not in architectures:
        raise EvalError(f"{folder}: a {', '.join(architectures)} folder; lmms-eval's llava_hf "
                        "loads the llava-hf layout: `vwlmm-convert import --vwlmm` it, then "
                        "`vwlmm-convert export --format llava-hf`")
    return True


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """The run folder of a trainer checkpoint (``<run_dir>/checkpoints/iter_N``, or a
    ``checkpoint.dir`` elsewhere: the run folder its config records), None for others."""
    if layout.folder_iteration(checkpoint) is None:
        return None
    root = checkpoint.parent
    if root.name == "checkpoints" and (root.parent / "config.json").is_file():
        return root.parent
    from megatron_vwlmm.checkpoint.metadata import TRAIN_CONFIG_KEY
    from megatron_vwlmm.checkpoint.safe_read import read_common

    recorded = (read_common(checkpoint).get(TRAIN_CONFIG_KEY) or {}).get("run_dir")
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    return None


def resolve(path: Path) -> Target:
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: does not exist")
    if _hf_llava(path):
        return Target(hf_dir=path)
    try:
        checkpoint = layout.find_checkpoint(path)
    except FileNotFoundError as exc:
        raise EvalError(str(exc)) from None
    return Target(checkpoint=checkpoint, run_dir=run_dir_of(checkpoint))


def default_output(run_dir: Path, checkpoint: Path) -> Path:
    return (Path(run_dir) / EVAL_FOLDER
            / layout.checkpoint_name(layout.folder_iteration(checkpoint)))


# -- running lmms-eval ---------------------------------------------------------------------------

def export(checkpoint: Path, out: Path, dtype: str) -> Path:
    """The checkpoint as a llava-hf folder, with its run data's tokenizer and template."""
    from megatron_vwlmm.convert.errors import (
        IncompleteCheckpointError,
        UnsupportedModelError,
        VocabMismatchError,
    )
    from megatron_vwlmm.convert.exporter import export_checkpoint

    say(f"exporting {checkpoint} to {out} ({dtype})")
    try:
        return export_checkpoint(str(checkpoint), str(out), format="llava-hf", dtype=dtype)
    except (IncompleteCheckpointError, UnsupportedModelError, VocabMismatchError,
            FileNotFoundError, ValueError) as exc:
        raise EvalError(f"{checkpoint}: cannot be exported for evaluation: {exc}") from None


_NOT_INHERITED = ("PYTHONPATH", "PYTHONHOME", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                  "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child_env() -> Dict[str, str]:
    """The environment of the isolated python: ours, without what would import the training
    venv's packages there, nor a process group's variables (the export's one-process group,
    a launcher's), which would make lmms-eval join a distributed job."""
    return {k: v for k, v in os.environ.items()
            if k not in _NOT_INHERITED and not k.startswith("TORCHELASTIC_")}


def run_lmms_eval(model_dir: Optional[Path], out: Path, request: Request) -> dict:
    """lmms-eval on ``model_dir`` in the isolated environment (None: only load the tasks'
    datasets); its output is shown as it comes and kept in ``<out>/lmms_eval.log``. Returns
    the runner's summary (results and files)."""
    python = eval_env.eval_python()
    out.mkdir(parents=True, exist_ok=True)
    summary = out / f".summary-{uuid.uuid4().hex}.json"
    cmd = [str(python), "-P", str(RUNNER), "--tasks", ",".join(request.tasks),
           "--summary", str(summary), "--device", request.device,
           "--batch-size", request.batch_size]
    cmd += ["--prefetch"] if model_dir is None else ["--model", str(model_dir), "--output",
                                                      str(out)]
    if request.limit is not None:
        cmd += ["--limit", str(request.limit)]
    for folder in request.include_paths:
        cmd += ["--include-path", folder]
    if model_dir is not None:
        say(f"lmms-eval: {', '.join(request.tasks)} on {model_dir} -> {out}")
    log = out / "lmms_eval.log"
    tail = b""
    with open(log, "ab") as keep, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT,
                                                   env=_child_env()) as proc:
        while chunk := proc.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            keep.write(chunk)
            tail = (tail + chunk)[-65536:]
        rc = proc.wait()
    if rc != 0:
        errors = [line for line in tail.splitlines() if line.startswith(_ERROR_PREFIX)]
        if errors:
            raise EvalError(errors[-1][len(_ERROR_PREFIX):].decode(errors="replace").strip())
        raise EvalError(f"lmms-eval exited with status {rc}; its output is in {log}")
    try:
        return json.loads(summary.read_text())
    finally:
        summary.unlink(missing_ok=True)


def scores(results: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
    """task -> metric -> value from lmms-eval's ``results`` (``"exact_match,none"`` becomes
    ``exact_match``, another filter stays in the name; standard errors stay in its JSON)."""
    out = {}
    for task, values in results.items():
        task_scores = {}
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            task_scores[metric if kind in ("", "none") else key] = value
        out[task] = task_scores
    return out


# -- a run's side: marker, metrics.jsonl, TensorBoard --------------------------------------------

def read_marker(out: Path, request: Request) -> Optional[dict]:
    try:
        record = json.loads((out / request.marker_name()).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == _MARKER_FORMAT \
        else None


def _run_config(run_dir: Path):
    from pipeline.config import ConfigError, train_config_from_dict

    path = Path(run_dir) / "config.json"
    try:
        return train_config_from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, ConfigError) as exc:
        raise EvalError(f"{path}: not readable as the run's config ({exc}); is {run_dir} a "
                        "training run folder?") from None


def publish(run_dir: Path, record: dict) -> int:
    """The marker's eval records in ``metrics.jsonl`` and TensorBoard, those not there yet;
    returns how many were written."""
    from pipeline.config import LoggingSection
    from pipeline.metrics import EVAL_SPLIT, METRICS_FILE, MetricsLogger, read_metrics

    done: Set[str] = set()
    if (Path(run_dir) / METRICS_FILE).is_file():
        done = {r.get("task") for r in read_metrics(run_dir)
                if r.get("split") == EVAL_SPLIT and r.get("evaluation") == record["id"]}
    todo = [task for task in record["metrics"] if task not in done]
    if not todo:
        return 0
    tensorboard = _run_config(run_dir).logging.tensorboard
    logger = MetricsLogger(Path(run_dir), True, LoggingSection(tensorboard=tensorboard),
                           world_size=1)
    try:
        for task in todo:
            logger.log_benchmark(record["iteration"], task, record["metrics"][task],
                                 {"checkpoint": record["checkpoint"],
                                  "evaluation": record["id"]})
    finally:
        logger.close()
    return len(todo)


def evaluate_checkpoint(checkpoint: Path, run_dir: Optional[Path], out: Path,
                        request: Request) -> dict:
    """Export, run lmms-eval, then (for a run's checkpoint) mark and publish; returns the
    marker's record."""
    with tempfile.TemporaryDirectory(prefix="vwlmm-eval-") as tmp:
        # lmms-eval names its output subfolder after the model folder's last two parts.
        hf = export(checkpoint, Path(tmp) / (run_dir.name if run_dir else "checkpoint") /
                    checkpoint.name, request.dtype)
        summary = run_lmms_eval(hf, out, request)
    compare_with_paper(request, summary["results_file"])
    iteration = layout.folder_iteration(checkpoint)
    record = {"format": _MARKER_FORMAT, "id": uuid.uuid4().hex,
              "checkpoint": layout.checkpoint_name(iteration), "iteration": iteration,
              "request": asdict(request), "results_file": summary["results_file"],
              "samples_files": summary["samples_files"],
              "metrics": scores(summary["results"])}
    if run_dir is not None:
        layout.write_file_atomic(out / request.marker_name(),
                                 json.dumps(record, indent=2).encode())
        hooks.fire("eval.marked", iteration=record["iteration"])
        publish(run_dir, record)
    return record


def compare_with_paper(request: Request, results_file: str) -> None:
    """With ``--tasks vwlmm-paper``: the user's figures beside the paper's and LLaVA-1.5-7B's
    (``pipeline/eval_paper.py``), as Markdown and PNG next to lmms-eval's results JSON."""
    if not request.paper_table:
        return
    from pipeline.eval_paper import write_comparison

    markdown, png = write_comparison(Path(results_file), Path(results_file).parent)
    print(markdown.read_text(), flush=True)
    say(f"comparison with the paper: {markdown} and {png}")


def watch(run_dir: Path, request: Request, output: Optional[Path], poll_s: float) -> List[dict]:
    """Evaluate each committed checkpoint of the run once, until the run is finished; returns
    the records of the evaluations this call made."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"--watch {run_dir}: no such run folder")
    made, published = [], set()
    waiting = False
    while True:
        cfg = _run_config(run_dir)  # re-read: a resume may extend the run
        root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        latest = layout.latest_checkpoint(root)
        # Decided before listing: when it is true, every checkpoint the run will have is there.
        finished = (latest is not None
                    and layout.folder_iteration(latest) >= cfg.train.train_iters)
        for checkpoint in layout.list_checkpoints(root):
            out = (output / checkpoint.name) if output else default_output(run_dir, checkpoint)
            marker = read_marker(out, request)
            if marker is not None:
                if checkpoint.name not in published:
                    publish(run_dir, marker)
                    published.add(checkpoint.name)
                continue
            waiting = False
            try:
                made.append(evaluate_checkpoint(checkpoint, run_dir, out, request))
            except EvalError as exc:
                if checkpoint.is_dir():  # else pruned by the run since it was listed
                    raise
                say(f"warning: {checkpoint.name} was pruned by the run before it was "
                    f"evaluated ({exc}); raise checkpoint.keep_last to evaluate every one")
                continue
            published.add(checkpoint.name)
        if finished:
            say(f"{run_dir}: finished at iteration {cfg.train.train_iters}; every checkpoint "
                "is evaluated")
            return made
        if not waiting:
            say(f"waiting for checkpoints of {run_dir} (checked every {poll_s:g} s; the run "
                f"ends at iteration {cfg.train.train_iters})")
            waiting = True
        time.sleep(poll_s)


# -- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vwlmm-eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Benchmark a VW-LMM model with lmms-eval (model llava_hf): an HF llava "
                    "folder, a megatron checkpoint (exported on the fly), or a run's checkpoints "
                    "(their scores also go to the run's metrics.jsonl and TensorBoard).")
    p.add_argument("path", nargs="?", type=Path,
                   help="HF llava folder, checkpoint folder (any TP/PP), checkpoint root or run "
                        "folder (its latest checkpoint)")
    p.add_argument("--watch", type=Path, metavar="RUN_DIR",
                   help="evaluate every checkpoint RUN_DIR's training writes, once each, and "
                        "stop when the run is finished (a restarted watcher resumes)")
    p.add_argument("--prefetch", action="store_true",
                   help="only download the tasks' datasets into HF_HOME (no model), for runs "
                        "with HF_DATASETS_OFFLINE=1 later")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lmms-eval task names (its own and --include-path's); "
                        "vwlmm-paper: the VW-LMM paper's benchmarks (docs/EVALUATION.md)")
    p.add_argument("--limit", type=float, default=None,
                   help="items per task (a fraction below 1); for trials, not for reporting")
    p.add_argument("--device", default=None,
                   help="torch device of the model (default: cuda when there is one, else cpu)")
    p.add_argument("--batch-size", default="1",
                   help="lmms-eval's batch size (its llava_hf model accepts 1)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lmms-eval task YAMLs (repeatable)")
    p.add_argument("--output", type=Path, default=None,
                   help="where lmms-eval's results JSON and per-sample logs go (default for "
                        "checkpoints of a run: <run_dir>/eval/iter_NNNNNNN; required otherwise)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of a checkpoint's export (default: bf16 on cuda, else fp32)")
    p.add_argument("--poll", type=float, default=60.0,
                   help="--watch: seconds between looks for new checkpoints")
    return p


def _request(args) -> Request:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise EvalError(f"--include-path {folder}: no such folder")
    from pipeline.eval_paper import PRESET, resolve_tasks

    return Request(tasks=tuple(resolve_tasks(args.tasks)),
                   paper_table=PRESET in (name.strip() for name in args.tasks.split(",")),
                   limit=limit, include_paths=tuple(str(Path(f).resolve())
                                                    for f in args.include_path),
                   device=device, batch_size=str(args.batch_size),
                   dtype=args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))


def _report(record: dict, out: Path) -> None:
    for task, values in record["metrics"].items():
        say(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    say(f"results: {record['results_file']} (per-sample logs beside it, under {out})")


def run(args) -> None:
    if [args.path is not None, args.watch is not None, args.prefetch].count(True) != 1:
        raise EvalError("give one of PATH, --watch RUN_DIR or --prefetch")
    request = _request(args)
    eval_env.eval_python()  # a missing environment is said before anything is exported
    if args.prefetch:
        with tempfile.TemporaryDirectory(prefix="vwlmm-eval-") as tmp:
            run_lmms_eval(None, Path(tmp), request)
        say(f"the datasets of {', '.join(request.tasks)} are in HF_HOME="
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}")
        return
    if args.watch is not None:
        watch(args.watch, request, args.output, args.poll)
        return
    target = resolve(args.path)
    if target.run_dir is None and args.output is None:
        raise EvalError(f"{args.path}: not a checkpoint of a training run; name where the "
                        "results go with --output DIR")
    if target.hf_dir is not None:
        summary = run_lmms_eval(target.hf_dir, args.output, request)
        compare_with_paper(request, summary["results_file"])
        record = {"results_file": summary["results_file"], "metrics": scores(summary["results"])}
        _report(record, args.output)
        return
    out = args.output or default_output(target.run_dir, target.checkpoint)
    _report(evaluate_checkpoint(target.checkpoint, target.run_dir, out, request), out)


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vwlmm-eval %(message)s")
    from megatron_vwlmm.parallel.megatron_compat import quiet_known_warnings

    quiet_known_warnings()
    try:
        run(args)
    except Refusal as exc:
        print(f"vwlmm-eval: error: {str(exc).strip()}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
