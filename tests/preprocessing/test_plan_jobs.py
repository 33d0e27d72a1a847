"""The planner in whole jobs: on a real Ray head, any partition count and worker count give the
same bytes and a job killed (SIGKILL) inside the dedup step resumes to the same bytes; in this
process, ``--plan-only`` then a full run, and reruns whose input files changed are refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.cli import config_from_args
from preprocessing.job_state import InputsChanged
from tests import faults
from tests.preprocessing.inline_job import run_inline
from tests.preprocessing.pp_checks import llava_args, run_cli, tree_digest

DEDUP_STATE = "_state/dedup/"


def _dataset_digest(root) -> dict[str, str]:
    """Every file but the partition-count-specific intermediate files of the dedup step."""
    return {k: v for k, v in tree_digest(root).items() if not k.startswith(DEDUP_STATE)}


def test_partitions_and_workers_do_not_change_the_bytes(ray_head, demo, tokenizer_dir, clean_run,
                                                         tmp_path):
    """clean_run: the default partition count (1 for the fixtures), 2 workers; here 7 and 1."""
    out = tmp_path / "p7"
    run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", out)
            + ["--dedup-partitions", "7", "--num-workers", "1"])
    assert len(list((out / DEDUP_STATE / "p0007" / "keys").iterdir())) == 7
    assert _dataset_digest(out) == _dataset_digest(clean_run)


def test_killed_in_the_dedup_step_resumes_identically(ray_head, demo, tokenizer_dir, clean_run,
                                                      tmp_path):
    """The driver SIGKILLs itself after two of the dedup step's tasks (3 partitions, 2 workers);
    the rerun produces the clean run's bytes."""
    out = tmp_path / "killed"
    args = llava_args(demo, tokenizer_dir, "vicuna_v1", out) + ["--dedup-partitions", "3"]
    cmd = [sys.executable, "-m", "preprocessing.cli", *args, "--num-workers", "2",
           "--ray-address", ray_head["address"]]
    res = subprocess.run(cmd, env={**ray_head["env"], **faults.env("kill_after_dedup_tasks=2")},
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == -9, res.stderr[-3000:]
    dedup_dir = out / DEDUP_STATE / "p0003"
    assert (dedup_dir / "map" / "000000.sections").exists()
    assert not (out / "_state" / "plan.json").exists() and not (out / "manifest.json").exists()
    assert len(list(dedup_dir.glob("keys/*.sections"))) < 3
    res = run_cli(ray_head, args)
    assert "unit(s) from 2 file(s); 1 duplicate(s), 0 renamed id(s)" in res.stderr
    assert _dataset_digest(out) == _dataset_digest(clean_run)


def _text_only(path: Path, ids: list[str]) -> None:
    path.write_text(json.dumps([{"id": i, "conversations": [
        {"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]} for i in ids]))


def test_changed_inputs_are_refused_naming_the_change(tokenizer_dir, tmp_path, monkeypatch, caplog):
    """A file that appears between runs would shift unit indices (units are positions in the
    sorted input list): refused for a planned job and for a finished one, before anything is read
    or written; so is a changed file. The whole driver runs in this process."""
    caplog.set_level(logging.INFO, logger="vwlmm.preprocess")
    inputs = tmp_path / "in"
    inputs.mkdir()
    _text_only(inputs / "b.json", ["b1", "b2"])
    _text_only(inputs / "c.json", ["c1", "c2"])
    out = tmp_path / "out"
    args = ["--source", "llava", "--input", str(inputs / "*.json"), "--image-root", str(tmp_path),
            "--tokenizer", tokenizer_dir, "--template", "vicuna_v1", "--output", str(out),
            "--samples-per-shard", "1", "--max-seq-len", "64", "--image-size", "28", "--no-progress"]

    def refused(what: str) -> str:
        before = tree_digest(out)
        with pytest.raises(InputsChanged) as exc:
            run_inline(monkeypatch, config_from_args(args))
        assert what in str(exc.value) and tree_digest(out) == before, str(exc.value)
        return str(exc.value)

    summary = run_inline(monkeypatch, config_from_args(args + ["--plan-only"]))
    assert summary.manifest is None
    assert (summary.plan["num_records"], summary.plan["num_units"]) == (4, 4)
    assert not (out / "_state" / "units").exists()
    _text_only(inputs / "a.json", ["a1"])  # sorts first: every unit index would move by one
    assert "unfinished job" in refused(f"1 added: {inputs / 'a.json'}")
    (inputs / "a.json").unlink()
    caplog.clear()
    summary = run_inline(monkeypatch, config_from_args(args))  # continues from the plan
    assert summary.manifest.num_samples == 4 and "planning" not in caplog.text
    _text_only(inputs / "a.json", ["a1"])
    assert "is complete" in refused(f"1 added: {inputs / 'a.json'}")
    (inputs / "a.json").unlink()
    _text_only(inputs / "c.json", ["c1", "c2", "c3"])
    refused(f"1 changed: {inputs / 'c.json'} (size")
    _text_only(inputs / "c.json", ["c1", "c2"])  # same bytes, but a new mtime: still a change
    refused(f"1 changed: {inputs / 'c.json'}")
