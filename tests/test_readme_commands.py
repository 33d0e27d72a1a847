"""The README's quick start runs as written, in a new user's shell.

The fenced blocks of README.md that follow a ``<!-- readme-test -->`` line are run in order, each
by bash, in one workspace folder laid out as the repository root (``configs/`` links to the
repository's), with an environment built from nothing (``tests.fresh_env``) and umask 022.
``SUBSTITUTIONS`` lists everything replaced: the address and token file of the Ray cluster the
user would have, here a ``LocalRayHead`` on 127.0.0.1. A README edit that breaks a command fails
here.

One module fixture runs every block once (a tiny dataset, two short torchrun launches); the
tests below read what it left.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from preprocessing.local_ray import LocalRayHead
from tests.fresh_env import fresh_user_env

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-test -->"
# README text -> what the test puts there ({dashboard} and {token} of the test's Ray head).
SUBSTITUTIONS = {"http://127.0.0.1:8265": "{dashboard}",
                 "/path/to/cluster/auth_token": "{token}"}
# What the quick start must keep showing (a removed marker or command fails here).
REQUIRED = {
    "preprocessing without a cluster": re.compile(r"^vwlmm-preprocess --source", re.M),
    "a Ray job": re.compile(r"^ray job submit .*-- \\\n\s+vwlmm-preprocess", re.M),
    "training a preset with --set": re.compile(r"^torchrun .*-m pipeline.train --config configs/",
                                                re.M),
    "export": re.compile(r"^vwlmm-convert export ", re.M),
    "visual words": re.compile(r"^vwlmm-visualize ", re.M),
}


def readme_blocks(text: str) -> list[str]:
    """The fenced blocks that directly follow the marker line (blank lines between allowed)."""
    return re.findall(re.escape(MARKER) + r"\s*\n```[^\n]*\n(.*?)\n```", text, re.S)


def _user_umask():
    os.umask(0o022)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every marked block run once as a new user would; returns the workspace and per-block
    results (stops at the first failing block)."""
    blocks = readme_blocks((REPO / "README.md").read_text())
    root = tmp_path_factory.mktemp("readme")
    work, home = root / "work", root / "home"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    env = fresh_user_env(home)
    results = []
    with LocalRayHead(fresh_user_env(root / "cluster-home"), num_cpus=2) as head:
        values = {"dashboard": head.dashboard, "token": head.token_path}
        for block in blocks:
            script = block
            for text, value in SUBSTITUTIONS.items():
                script = script.replace(text, value.format(**values))
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=900,
                                 preexec_fn=_user_umask)
            results.append({"block": block, "rc": res.returncode,
                            "out": res.stdout[-4000:] + res.stderr[-8000:]})
            if res.returncode != 0:
                break
    return {"work": work, "home": home, "blocks": blocks, "results": results}


def test_every_marked_block_runs(readme_run):
    for r in readme_run["results"]:
        assert r["rc"] == 0, f"README block failed:\n{r['block']}\n--- output:\n{r['out']}"
    assert len(readme_run["results"]) == len(readme_run["blocks"]) >= 3


def test_the_quick_start_covers_the_user_path_and_every_substitution_is_used():
    text = "\n".join(readme_blocks((REPO / "README.md").read_text()))
    missing = [what for what, pattern in REQUIRED.items() if not pattern.search(text)]
    assert missing == []
    assert [s for s in SUBSTITUTIONS if s not in text] == []


def test_outputs_of_the_quick_start(readme_run):
    work = readme_run["work"]
    assert all(r["rc"] == 0 for r in readme_run["results"])
    for name in ("laion", "llava"):
        manifest = json.loads((work / "data" / name / "manifest.json").read_text())
        assert manifest["num_samples"] > 0
    # The second launch resumed the first: one run, iterations 1..6 each logged once.
    iterations = [json.loads(line)["iteration"] for line in
                  (work / "runs/tiny/metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "train"]
    assert iterations == list(range(1, 7))
    assert (work / "runs/tiny/checkpoints/latest").read_text().strip() == "iter_0000006"
    assert (work / "hf/tiny/config.json").is_file()
    assert (work / "words.png").stat().st_size > 0
    assert not (readme_run["home"] / ".ray").exists()


def test_outputs_are_readable_by_other_users(readme_run):
    """Under umask 022 every file the project wrote for the user is 0644 and every folder 0755
    (a training job of another account reads the dataset; a colleague loads the export)."""
    work = readme_run["work"]
    assert all(r["rc"] == 0 for r in readme_run["results"])
    wrong = []
    for top in ("tok", "data", "runs", "hf"):
        for path in [work / top, *(work / top).rglob("*")]:
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            want = 0o755 if path.is_dir() else 0o644
            if mode != want:
                wrong.append(f"{oct(mode)} {path.relative_to(work)}")
    assert wrong == [], "\n".join(wrong)
