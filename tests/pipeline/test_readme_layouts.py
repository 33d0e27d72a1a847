"""Every training launch the README and the presets show passes the trainer's config check at
the GPU count it is shown with (``python -m pipeline.train --check --gpus N``), so an example
that would be refused at start (a global batch that DP x micro-batch does not divide) fails
here instead. Also: ``--check`` and a misspelt key answer fast, in one line, before megatron
loads.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _shown_launches():
    """(where, GPU count, trainer arguments) of each sbatch / torchrun training example."""
    found = []
    texts = {"README.md": (REPO / "README.md").read_text()}
    texts.update({str(p.relative_to(REPO)): p.read_text() for p in sorted(REPO.glob("configs/*.yaml"))})
    for name, text in texts.items():
        joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)  # continuation lines (also in YAML comments)
        for line in joined.splitlines():
            line = line.strip().lstrip("#").strip().removeprefix("Launch:").strip()
            line = re.sub(r"<[^>]*>", "x", line)  # placeholders such as <preprocessing output>
            if "cluster/slurm/train.sbatch configs/" in line and line.startswith("sbatch"):
                words = shlex.split(line)
                nodes = int(words[words.index("--nodes") + 1])
                gpus = nodes * int(words[words.index("--gpus-per-node") + 1])
                args = words[words.index("cluster/slurm/train.sbatch") + 1:]
                found.append((name, gpus, ["--config", *args]))
            elif line.startswith("torchrun") and "pipeline.train" in line and "--config" in line:
                words = [w for w in shlex.split(line) if w != "..."]
                gpus = int(words[words.index("--nproc_per_node") + 1])  # --nnodes N: one node
                rest = words[words.index("pipeline.train") + 1:]
                found.append((name, gpus, rest))
    return found


LAUNCHES = _shown_launches()


def _check(args, gpus):
    return subprocess.run([sys.executable, "-m", "pipeline.train", "--check", "--gpus", str(gpus),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_readme_and_every_preset_show_a_launch():
    assert {name for name, _, _ in LAUNCHES} >= {
        "README.md", "configs/stage1-vicuna-7b.yaml", "configs/stage1-mistral-7b.yaml",
        "configs/stage2-vicuna-7b.yaml", "configs/stage2-mistral-7b.yaml"}


@pytest.mark.parametrize("where, gpus, args", LAUNCHES,
                         ids=[f"{w}:{g}gpus:{i}" for i, (w, g, _) in enumerate(LAUNCHES)])
def test_shown_launch_passes_the_config_check(where, gpus, args):
    proc = _check(args, gpus)
    assert proc.returncode == 0 and "config check passed" in proc.stdout, \
        f"{where}: {' '.join(args)} at {gpus} GPUs:\n{proc.stderr}"
    assert f"layout: {gpus} processes" in proc.stdout


def test_a_bad_key_fails_fast_in_one_line():
    """One line, exit 2, and neither torch nor megatron-core imported before the config is read
    (what makes it answer in about a second)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config",
                           "configs/tiny-cpu.yaml", "--set", "optim.lrr=1e-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "did you mean optim.lr?" in proc.stderr, proc.stderr
    assert "megatron" not in proc.stderr and proc.stdout == ""
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, pipeline.train as t\n"
        "try:\n    t.main(['--config', 'configs/tiny-cpu.yaml', '--set', 'optim.lrr=1'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().endswith("[]"), probe.stdout + probe.stderr
