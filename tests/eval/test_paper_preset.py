"""The ``vwlmm-paper`` preset against the installed lmms-eval, and the comparison table.

The registry test asks lmms-eval's own ``TaskManager`` (in the isolated environment), so a task
or metric renamed by a new lmms-eval release fails here rather than in a night's evaluation.
The table tests feed ``pipeline/eval_paper.py`` a results JSON laid out as lmms-eval 0.7.3
writes it (``evaluator.evaluate``'s dict plus the tracker's fields, see ``_results_json``).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline import eval_paper
from pipeline.eval_paper import COLUMNS, PRESET, REFERENCES, resolve_tasks
from vwlmm_data.errors import Refusal

# Runs in the isolated environment: every preset task's registration and the metric names of
# its config, as one JSON line. Indexing reads the tasks' YAML files only; nothing is loaded.
REGISTRY_SCRIPT = r"""
import json, sys
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import load_yaml_config

manager = TaskManager(verbosity="ERROR")
found = {}
for name in sys.argv[1:]:
    entry = manager.task_index.get(name)
    if entry is None or entry["type"] != "task":
        found[name] = None
        continue
    config = load_yaml_config(entry["yaml_path"], mode="simple")
    found[name] = [m["metric"] for m in config.get("metric_list", [])]
print(json.dumps(found))
"""


def test_preset_tasks_and_metrics_exist_in_lmms_eval(eval_python, tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    tasks = resolve_tasks(PRESET)
    proc = subprocess.run([str(eval_python), "-c", REGISTRY_SCRIPT, *tasks], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [t for t in tasks if found[t] is None]
    assert not missing, f"not registered in lmms-eval: {missing}"
    for column in COLUMNS:
        assert column.metric in found[column.task], (column.name, found[column.task])
    # Listing tasks fetched nothing into the Hugging Face cache.
    assert list(hf_home.iterdir()) == []


def test_resolve_tasks():
    preset = resolve_tasks(PRESET)
    assert preset == [c.task for c in COLUMNS] and len(set(preset)) == len(COLUMNS) == 9
    assert resolve_tasks(" mme , gqa,vwlmm-paper ,mme") == ["mme", "gqa"] + [
        t for t in preset if t != "gqa"]
    assert resolve_tasks("textvqa_val") == ["textvqa_val"]
    for bad in ("", " ", "gqa,,pope", "gqa,"):
        with pytest.raises(Refusal):
            resolve_tasks(bad)


def test_references_cover_every_column():
    names = {c.name for c in COLUMNS}
    for ref in REFERENCES:
        assert set(ref.scores) == names, ref.label


def _task_entry(metrics: dict, samples: int) -> dict:
    """One task under "results": alias, "<metric>,none" and "<metric>_stderr,none" per metric,
    and the sample count (``evaluator_utils.consolidate_results``)."""
    entry = {"alias": None, "samples": samples}
    for metric, value in metrics.items():
        entry[f"{metric},none"] = value
        entry[f"{metric}_stderr,none"] = "N/A"
    return entry


def _results_json(path, limit=None):
    """A run of part of the preset: VizWiz, MM-Vet and MMBench-CN missing; TextVQA with its
    ``submission`` metric (no value) beside the score; MMBench only partly run."""
    tasks = {
        "vqav2_val": ({"exact_match": 0.7712}, 214354),
        "gqa": ({"exact_match": 0.6104}, 12578),
        "scienceqa_img": ({"exact_match": 0.6981}, 2017),
        "textvqa_val": ({"exact_match": 0.5533, "submission": None}, 5000),
        "pope": ({"pope_accuracy": 0.871, "pope_precision": 0.9, "pope_recall": 0.8,
                  "pope_f1_score": 0.8472, "pope_yes_ratio": 0.5}, 9000),
        "mmbench_en_dev": ({"gpt_eval_score": 63.4, "submission": None}, 500),
    }
    results = {}
    for name, (metrics, n) in tasks.items():
        results[name] = _task_entry(metrics, n)
        results[name]["alias"] = name
    data = {
        "results": results,
        "group_subtasks": {name: [] for name in reversed(list(tasks))},
        "configs": {name: {"task": name, "output_type": "generate_until"} for name in tasks},
        "versions": {name: "Yaml" for name in tasks},
        "n-shot": {name: 0 for name in tasks},
        "higher_is_better": {name: {m: True for m in tasks[name][0]} for name in tasks},
        "n-samples": {name: {"original": n, "effective": n} for name, (_, n) in tasks.items()},
        "config": {"model": "llava_hf", "model_args": "pretrained=/runs/s2/hf",
                   "batch_size": "1", "batch_sizes": [], "device": "cuda:0", "use_cache": None,
                   "limit": limit, "bootstrap_iters": 100000, "gen_kwargs": "",
                   "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234,
                   "fewshot_seed": 1234},
        "git_hash": None, "git_branch": None, "lmms_eval_version": "0.7.3",
        "date": "20260101_120000",
        "task_hashes": {},
        "model_source": "llava_hf", "model_name": "/runs/s2/hf",
        "model_name_sanitized": "__runs__s2__hf", "system_instruction": None,
        "system_instruction_sha": None, "fewshot_as_multiturn": False, "chat_template": None,
        "chat_template_sha": None, "start_time": 1.0, "end_time": 2.0,
        "total_evaluation_time_seconds": "1.0",
    }
    data["n-samples"]["mmbench_en_dev"] = {"original": 4377, "effective": 500}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _table_rows(markdown: str) -> dict:
    """The first table's rows, by benchmark name (the GPT-judge marker stripped)."""
    rows = {}
    for line in markdown.split("## How each column")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("benchmark", "---"):
            rows[cells[0].replace(" (GPT judge)", "")] = cells[1:]
    return rows


def test_comparison_table(tmp_path):
    # lmms-eval's own layout: <output>/<model_name_sanitized>/<date>_results.json
    results = _results_json(tmp_path / "lmms" / "__runs__s2__hf" / "20260101_120000_results.json")
    md_path, png_path = eval_paper.write_comparison(tmp_path / "lmms", tmp_path / "out")
    assert (md_path.name, png_path.name) == ("vwlmm-paper.md", "vwlmm-paper.png")
    rows = _table_rows(md_path.read_text())
    assert list(rows) == [c.name for c in COLUMNS]
    labels = [r.label for r in REFERENCES]
    assert labels[:3] == ["VW-LMM Vicuna-7B (paper)", "VW-LMM Mistral-7B (paper)",
                          "LLaVA-1.5-7B (paper)"]
    # this run | VW-LMM Vicuna-7B | VW-LMM Mistral-7B | LLaVA-1.5-7B
    assert rows["VQAv2"] == ["77.1", "78.9", "80.8", "78.5"]
    assert rows["GQA"] == ["61.0", "62.7", "65.4", "62.0"]
    assert rows["VizWiz"] == ["not run", "48.3", "58.5", "50.0"]
    assert rows["SQA-IMG"] == ["69.8", "68.1", "75.9", "66.8"]
    assert rows["TextVQA"] == ["55.3", "57.6", "63.1", "58.2"]
    assert rows["POPE"] == ["84.7", "85.9", "87.0", "85.9"]  # F1, not accuracy
    assert rows["MMBench"] == ["63.4 (500 of 4377 samples)", "65.9", "80.6", "64.3"]
    assert rows["MMBench-CN"] == ["not run", "59.8", "79.0", "58.3"]
    assert rows["MM-Vet"] == ["not run", "31.3", "44.0", "30.5"]
    text = md_path.read_text()
    assert "| MM-Vet (GPT judge) |" in text and "| GQA |" in text
    # The protocol travels with the figures: VQAv2's paper split is scored by a server only.
    assert "| VQAv2 | `vqav2_val` (`exact_match`) | val | test-dev | EvalAI" in text
    assert str(results) in text

    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png_path)
    assert image.shape[0] > 200 and image.shape[1] > 600


def test_no_numeric_score_and_empty_results(tmp_path):
    path = _results_json(tmp_path / "r_results.json")
    data = json.loads(path.read_text())
    data["results"]["gqa"]["exact_match,none"] = None
    assert eval_paper.column_cell(data, COLUMNS[1]) == "no score"
    assert eval_paper.run_scores(data)["GQA"] is None
    empty = {"results": {}}
    assert set(eval_paper.run_scores(empty).values()) == {None}
    md, png = eval_paper.write_comparison(_write(tmp_path / "e.json", empty), tmp_path / "e")
    assert all(r[0] == "not run" for r in _table_rows(md.read_text()).values())
    assert png.stat().st_size > 0


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_cli(tmp_path, capsys):
    path = _results_json(tmp_path / "x_results.json")
    assert eval_paper.main([str(path), "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| GQA | 61.0 |" in out and (tmp_path / "o" / "vwlmm-paper.png").is_file()
    assert eval_paper.main(["--list-tasks"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(resolve_tasks(PRESET))
    assert eval_paper.main([str(_write(tmp_path / "bad.json", {"no": 1}))]) == 2
    assert "not lmms-eval's results JSON" in capsys.readouterr().err
    assert eval_paper.main([str(tmp_path / "absent")]) == 2


def test_vwlmm_eval_writes_the_comparison_for_the_paper_preset(tmp_path, capsys):
    """``vwlmm-eval --tasks vwlmm-paper`` (and only then) puts the comparison beside lmms-eval's
    results JSON and prints it."""
    from pipeline import evaluate

    parser = evaluate._parser()
    paper = evaluate._request(parser.parse_args(["x", "--tasks", "vwlmm-paper,mme",
                                                 "--device", "cpu"]))
    other = evaluate._request(parser.parse_args(["x", "--tasks", "mme", "--device", "cpu"]))
    assert paper.paper_table and not other.paper_table
    assert paper.digest() == evaluate.Request(tasks=paper.tasks).digest()  # same evaluation
    results = _results_json(tmp_path / "lmms" / "m" / "20260101_120000_results.json")
    evaluate.compare_with_paper(other, str(results))
    assert not (results.parent / "vwlmm-paper.md").exists()
    evaluate.compare_with_paper(paper, str(results))
    assert (results.parent / "vwlmm-paper.png").is_file()
    assert "| GQA | 61.0 |" in capsys.readouterr().out
