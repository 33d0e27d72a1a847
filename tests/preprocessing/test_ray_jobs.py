"""End-to-end preprocessing on a real Ray head (127.0.0.1): `ray job submit`, every reject class,
template decoding, 1 vs 2 workers, a killed worker and a killed job, both resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import faults
from tests.preprocessing.pp_checks import (check_output, laion_args, llava_args, render_ids, run_cli,
                       supervised_runs, tree_digest)
from preprocessing.templates import VICUNA_SYSTEM
from preprocessing.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _llava_entries(demo) -> dict[str, dict]:
    return {str(e.get("id")): e for p in demo.llava_json for e in json.loads(p.read_text())}


def _expected_llava(entry: dict, template: str) -> tuple[str, list[str]]:
    """(rendered conversation, supervised runs), written independently of preprocessing: LLaVA
    moves the one image tag to the front of its turn; every other text is used as written."""
    turns = [(t["from"], t["value"]) for t in entry["conversations"]]
    if "image" in entry:
        turns = [(r, ("<image>\n" + v.replace("<image>", "").strip()).strip() if "<image>" in v
                  else v) for r, v in turns]
    answers = [v for r, v in turns if r == "gpt"]
    qs = [v for r, v in turns if r == "human"]
    if template == "plain":
        return "<s>" + "<image>" * ("image" in entry) + answers[0] + "\n", [answers[0] + "\n"]
    runs = [a + "</s>" for a in answers]
    if template == "vicuna_v1":
        body = "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in zip(qs, answers))
        return f"<s>{VICUNA_SYSTEM} {body}", runs
    return "<s>" + "".join(f"[INST] {q} [/INST]{a}</s>" for q, a in zip(qs, answers)), runs


def test_laion_ray_job_submit(ray_head, demo, tokenizer_dir, tok, tmp_path):
    out = tmp_path / "laion"
    workdir = tmp_path / "job"
    workdir.mkdir()
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
           ray_head["dashboard"], "--working-dir", str(workdir), "--",
           "vwlmm-preprocess", *laion_args(demo, tokenizer_dir, out)]
    res = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "succeeded" in res.stdout, res.stdout[-4000:] + res.stderr[-4000:]
    assert "samples written" in res.stdout  # the final summary reached the job log
    samples = check_output(str(out), demo.laion_expected, tok, formats=("webdataset", "arrow"))
    manifest = json.loads((out / "manifest.json").read_text())  # LLaVA-1.5 stage-1 choices
    assert (manifest["image_mode"], manifest["config"]["tokenizer_backend"],
            manifest["config"]["plain_eos"]) == ("crop", "sentencepiece", False)
    for sid, s in samples.items():
        caption = json.loads(s["meta"])["caption"]
        assert render_ids(s["input_ids"], tok) == f"<s><image>{caption}\n"
        assert supervised_runs(s, tok) == [caption + "\n"]  # LLaVA's preprocess_plain: no EOS
        assert s["input_ids"][1] == -200  # the image sits right after BOS


def _llava_checks(out, demo, tok, template):
    expected = dict(demo.llava_expected)
    if template == "plain":
        expected.update({k: "template_incompatible" for k in demo.llava_multi_turn})
    samples = check_output(str(out), expected, tok)
    entries = _llava_entries(demo)
    for sid, s in samples.items():
        text, runs = _expected_llava(entries[sid], template)
        assert render_ids(s["input_ids"], tok) == text, sid
        assert supervised_runs(s, tok) == runs, sid
    moved = json.loads(samples["multi.turn/1"]["meta"]) if "multi.turn/1" in samples else {}
    assert template == "plain" or moved.get("image_tag_moved") is True


def test_llava_vicuna_rerun_is_a_no_op(ray_head, demo, tokenizer_dir, tok, clean_run):
    _llava_checks(clean_run, demo, tok, "vicuna_v1")
    before = tree_digest(clean_run)
    res = run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", clean_run))
    assert "nothing to do" in res.stderr and tree_digest(clean_run) == before


def test_llava_mistral(ray_head, demo, tokenizer_dir, tok, tmp_path):
    run_cli(ray_head, llava_args(demo, tokenizer_dir, "mistral", tmp_path / "o"))
    _llava_checks(tmp_path / "o", demo, tok, "mistral")


def test_one_worker_with_a_killed_worker_equals_two_clean_workers(ray_head, demo, tokenizer_dir,
                                                                   clean_run, tmp_path):
    """One run proves two properties (CI time): 1 worker == 2 workers byte for byte, and a worker
    dying hard halfway through a unit (Ray retries it) changes nothing."""
    marker = tmp_path / "crashed"
    out = tmp_path / "worker_kill"
    run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", out) + ["--num-workers", "1"],
            env=faults.env(f"crash_unit_once=1:{marker}"))
    assert marker.exists(), "the injected worker crash did not happen"
    assert tree_digest(out) == tree_digest(clean_run)


def test_killed_job_resumes_identically(ray_head, demo, tokenizer_dir, clean_run, tmp_path):
    """The whole job (driver and its tasks) is SIGKILLed after its first finished unit."""
    out = tmp_path / "job_kill"
    args = [sys.executable, "-m", "preprocessing.cli",
            *llava_args(demo, tokenizer_dir, "vicuna_v1", out), "--num-workers", "1",
            "--ray-address", ray_head["address"]]
    proc = subprocess.Popen(args, env=ray_head["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    units = out / "_state" / "units"
    deadline = time.time() + 180
    while not (units.is_dir() and any(units.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "job ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list(units.iterdir()))
    assert done_before < 5
    res = run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", out))
    assert f"resuming: {done_before} of 5" in res.stderr
    assert tree_digest(out) == tree_digest(clean_run)


def test_config_change_is_refused(ray_head, demo, tokenizer_dir, clean_run):
    out = clean_run
    before = tree_digest(out)
    args = [sys.executable, "-m", "preprocessing.cli",
            *llava_args(demo, tokenizer_dir, "mistral", out), "--ray-address", ray_head["address"]]
    res = subprocess.run(args, env=ray_head["env"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "different config (fields ['template'])" in res.stderr
    assert tree_digest(out) == before
