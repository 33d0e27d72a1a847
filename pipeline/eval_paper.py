"""The VW-LMM paper's benchmark table as an lmms-eval task preset, and the run set beside it.

``--tasks vwlmm-paper`` stands for one lmms-eval task per column of the paper's main table
(``COLUMNS``); ``write_comparison`` reads the results JSON lmms-eval wrote for such a run and
puts the run's figures next to the paper's VW-LMM and LLaVA-1.5-7B figures (``REFERENCES``), as
Markdown and as a PNG.

The tasks are the closest ones lmms-eval has, not always the paper's protocol: VQAv2 and VizWiz
are reported on test-dev splits that only their evaluation servers score, so the preset runs
the local validation splits; MMBench and MM-Vet are scored with a GPT model's help. Each column
carries what differs (split, scorer, prompt) and the table prints it beside the figures, so no
number is read as more comparable than it is.

Only data and pure functions here, plus matplotlib for the PNG: this module runs in the training
venv and never imports lmms-eval (which lives in its own environment, ``pipeline/eval_env.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vwlmm_data.errors import Refusal

PRESET = "vwlmm-paper"
MARKDOWN_FILE = "vwlmm-paper.md"
PNG_FILE = "vwlmm-paper.png"
NOT_RUN = "not run"
NO_SCORE = "no score"


@dataclass(frozen=True)
class PaperColumn:
    """One column of the paper's table and the lmms-eval task that stands for it."""

    name: str  # the column's header in the paper
    task: str  # the lmms-eval task run for it
    metric: str  # the metric read from lmms-eval's results, under the key "<metric>,none"
    scale: float  # lmms-eval's value x scale = the paper's percent (some metrics are fractions)
    split: str  # what the task scores
    paper_split: str  # what the paper reports
    server: Optional[str] = None  # who alone scores the paper's split (its answers are hidden)
    judge: Optional[str] = None  # what a GPT model decides in the score (None: rules only)
    note: str = ""  # anything else that differs from the paper's protocol


# The order of the paper's table. "The paper's split" is that of LLaVA-1.5's evaluation
# protocol: VW-LMM builds on LLaVA-1.5's code and data and lists LLaVA-1.5's figures beside its
# own in the same columns. What the tasks score: their configs in lmms-eval 0.7.3.
COLUMNS: Tuple[PaperColumn, ...] = (
    PaperColumn("VQAv2", "vqav2_val", "exact_match", 100.0, "val", "test-dev",
                server="EvalAI (lmms-eval's vqav2_test writes the submission file)"),
    PaperColumn("GQA", "gqa", "exact_match", 100.0, "testdev-balanced",
                "testdev-balanced"),
    PaperColumn("VizWiz", "vizwiz_vqa_val", "exact_match", 100.0, "val", "test-dev",
                server="EvalAI (lmms-eval's vizwiz_vqa_test writes the submission file)"),
    PaperColumn("SQA-IMG", "scienceqa_img", "exact_match", 100.0, "test, questions with an image",
                "test, questions with an image"),
    PaperColumn("TextVQA", "textvqa_val", "exact_match", 100.0, "val", "val",
                note="LLaVA-1.5's prompts add the image's OCR tokens; lmms-eval's do not"),
    PaperColumn("POPE", "pope", "pope_f1_score", 100.0,
                "COCO adversarial, popular and random subsets, F1 over their pool",
                "the same subsets, F1 averaged over them"),
    PaperColumn("MMBench", "mmbench_en_dev", "gpt_eval_score", 1.0, "dev", "dev",
                note="LLaVA-1.5's figures come from the MMBench evaluation server",
                judge="maps answers no rule can read to an option letter (without a key: a "
                      "random letter); mmbench_en_dev_static is the rules-only variant"),
    PaperColumn("MMBench-CN", "mmbench_cn_dev", "gpt_eval_score", 1.0, "dev", "dev",
                note="LLaVA-1.5's figures come from the MMBench evaluation server",
                judge="maps answers no rule can read to an option letter (without a key: a "
                      "random letter)"),
    PaperColumn("MM-Vet", "mmvet", "gpt_eval_score", 1.0, "all 218 questions",
                "all 218 questions", note="LLaVA-1.5 graded with MM-Vet's GPT-4 evaluator",
                judge="grades every answer from 0 to 1 (lmms-eval's default judge is "
                      "gpt-4o-2024-11-20; without a key every answer scores 0)"),
)


@dataclass(frozen=True)
class Reference:
    """Published figures for one model, in percent, by column name (None: not reported)."""

    label: str
    source: str
    scores: Mapping[str, Optional[float]]


REFERENCES: Tuple[Reference, ...] = (
    Reference("VW-LMM Vicuna-7B (paper)", "the VW-LMM paper's comparison table", {
        "VQAv2": 78.9, "GQA": 62.7, "VizWiz": 48.3, "SQA-IMG": 68.1, "TextVQA": 57.6,
        "POPE": 85.9, "MMBench": 65.9, "MMBench-CN": 59.8, "MM-Vet": 31.3}),
    Reference("VW-LMM Mistral-7B (paper)", "the VW-LMM paper's comparison table", {
        "VQAv2": 80.8, "GQA": 65.4, "VizWiz": 58.5, "SQA-IMG": 75.9, "TextVQA": 63.1,
        "POPE": 87.0, "MMBench": 80.6, "MMBench-CN": 79.0, "MM-Vet": 44.0}),
    Reference("LLaVA-1.5-7B (paper)", "the LLaVA-1.5 paper, as quoted in the VW-LMM paper's table",
              {"VQAv2": 78.5, "GQA": 62.0, "VizWiz": 50.0, "SQA-IMG": 66.8, "TextVQA": 58.2,
               "POPE": 85.9, "MMBench": 64.3, "MMBench-CN": 58.3, "MM-Vet": 30.5}),
)


def resolve_tasks(spec: str) -> List[str]:
    """The lmms-eval task names of a ``--tasks`` value.

    ``spec`` is a comma-separated list of names; ``vwlmm-paper`` stands for the preset's tasks in
    the paper's column order, and every other name passes through unchanged (lmms-eval itself
    says whether it exists). Repeated names are kept once, first place wins. A Refusal for an
    empty value or an empty name (``a,,b``).
    """
    names: List[str] = []
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise Refusal(f"--tasks {spec!r}: give comma-separated lmms-eval task names, or "
                      f"{PRESET} for the paper's table")
    for part in parts:
        for name in ([c.task for c in COLUMNS] if part == PRESET else [part]):
            if name not in names:
                names.append(name)
    return names


def find_results(path: Path) -> Path:
    """``path`` itself when it is a file; in a folder, the newest ``*_results.json`` beneath it
    (lmms-eval writes ``<output>/<model>/<date>_results.json``)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*_results.json"), key=lambda p: p.stat().st_mtime) \
        if path.is_dir() else []
    if not found:
        raise Refusal(f"{path}: no lmms-eval results (a *_results.json file or a folder "
                      "holding one)")
    return found[-1]


def load_results(path: Path) -> dict:
    """lmms-eval's results JSON (see ``find_results``), checked for its ``results`` mapping."""
    path = find_results(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Refusal(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise Refusal(f"{path}: not lmms-eval's results JSON (no 'results' mapping of tasks)")
    return data


def _metric_value(task_results: Mapping, metric: str) -> Optional[float]:
    # Keys are "<metric>,<filter>"; generation tasks without filters use the filter "none".
    keys = [f"{metric},none"] + sorted(k for k in task_results if k.startswith(f"{metric},"))
    for key in keys:
        value = task_results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def run_scores(results: Mapping) -> Dict[str, Optional[float]]:
    """The run's figure per column in percent; None where the task did not run or has no
    numeric score (``column_cell`` says which)."""
    tasks = results.get("results", {})
    scores: Dict[str, Optional[float]] = {}
    for c in COLUMNS:
        value = _metric_value(tasks[c.task], c.metric) if c.task in tasks else None
        scores[c.name] = None if value is None else value * c.scale
    return scores


def column_cell(results: Mapping, column: PaperColumn) -> str:
    """The run's cell for one column: the figure (with the sample count when lmms-eval ran a
    subset, e.g. under ``--limit``), ``not run`` or ``no score``."""
    tasks = results.get("results", {})
    if column.task not in tasks:
        return NOT_RUN
    value = _metric_value(tasks[column.task], column.metric)
    if value is None:
        return NO_SCORE
    cell = f"{value * column.scale:.1f}"
    counts = results.get("n-samples", {}).get(column.task, {})
    effective, original = counts.get("effective"), counts.get("original")
    if isinstance(effective, int) and isinstance(original, int) and effective < original:
        cell += f" ({effective} of {original} samples)"
    return cell


def _figure(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def comparison_markdown(results: Mapping, source: str = "") -> str:
    """The comparison as Markdown: one row per paper column, the run beside the references,
    then the protocol of each column and where each reference figure comes from."""
    model = (results.get("config") or {}).get("model_args") or results.get("model_name") or ""
    title = "# VW-LMM paper benchmarks" + (f": {model}" if model else "")
    head = ["benchmark", "this run", *(r.label for r in REFERENCES)]
    lines = [title, ""]
    if source:
        lines += [f"lmms-eval results: `{source}`", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in COLUMNS:
        marker = " (GPT judge)" if c.judge else ""
        refs = [_figure(r.scores.get(c.name)) for r in REFERENCES]
        lines.append(f"| {c.name}{marker} | {column_cell(results, c)} | " + " | ".join(refs) + " |")
    lines += ["", "## How each column is scored", "",
              "| benchmark | lmms-eval task (metric) | split here | the paper's split | "
              "only scored by | GPT judge | other differences |", "|---|---|---|---|---|---|---|"]
    for c in COLUMNS:
        lines.append(f"| {c.name} | `{c.task}` (`{c.metric}`) | {c.split} | {c.paper_split} | "
                     f"{c.server or '-'} | {c.judge or 'no'} | {c.note or '-'} |")
    lines += ["", "GPT judges read `OPENAI_API_KEY` (lmms-eval's `MODEL_VERSION` picks the model).",
              "", "Reference figures: " + "; ".join(f"{r.label}: {r.source}" for r in REFERENCES)
              + ".", ""]
    return "\n".join(lines)


def comparison_png(results: Mapping, out: Path) -> Path:
    """Grouped bars per paper column: the run and each reference; a column the run lacks is
    labelled ``not run`` (or ``no score``) where its bar would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = run_scores(results)
    series = [("this run", [mine[c.name] for c in COLUMNS])]
    series += [(r.label, [r.scores.get(c.name) for c in COLUMNS]) for r in REFERENCES]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(13, 5))
    for i, (label, values) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(COLUMNS))]
        present = [(x, v) for x, v in zip(xs, values) if v is not None]
        if present:
            ax.bar(*zip(*present), width, label=label)
        else:  # keep the legend entry and colour order even when nothing of it is plotted
            ax.bar([], [], width, label=label)
        if i == 0:
            for x, v, c in zip(xs, values, COLUMNS):
                if v is None:
                    ax.text(x, 1, column_cell(results, c), rotation=90, ha="center",
                            va="bottom", fontsize=8)
    ax.set_xticks(range(len(COLUMNS)))
    ax.set_xticklabels([c.name + (" *" if c.judge else "") for c in COLUMNS])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series))
    ax.set_title("VW-LMM paper benchmarks (* GPT judge; VQAv2 and VizWiz: val here, "
                 "test-dev in the papers)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def write_comparison(results_json: Path, out_dir: Path) -> Tuple[Path, Path]:
    """Write ``vwlmm-paper.md`` and ``vwlmm-paper.png`` into ``out_dir`` from lmms-eval's results
    JSON (a file, or a folder holding ``*_results.json``); returns their paths."""
    path = find_results(results_json)
    results = load_results(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / MARKDOWN_FILE
    md.write_text(comparison_markdown(results, source=str(path)))
    return md, comparison_png(results, out_dir / PNG_FILE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.eval_paper",
        description=f"Set lmms-eval results beside the VW-LMM paper's table (the {PRESET} "
                    "task preset): writes vwlmm-paper.md and vwlmm-paper.png and prints the "
                    "Markdown. Tasks that did not run show as 'not run'.")
    parser.add_argument("results", nargs="?", type=Path,
                        help="lmms-eval's results JSON, or a folder holding *_results.json "
                             "(the newest is used)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for the two files (default: the results file's folder)")
    parser.add_argument("--list-tasks", action="store_true",
                        help=f"print the lmms-eval tasks of {PRESET}, comma-separated, and exit")
    args = parser.parse_args(argv)
    if args.list_tasks:
        print(",".join(resolve_tasks(PRESET)))
        return 0
    if args.results is None:
        parser.error("give a results JSON (or --list-tasks)")
    try:
        path = find_results(args.results)
        md, png = write_comparison(path, args.output or path.parent)
    except Refusal as exc:
        print(f"vwlmm eval: error: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
