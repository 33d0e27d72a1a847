"""``vwlmm_data`` is the bottom layer: every module of it imports with torch, megatron and the
project's upper packages made unimportable (CPU-only Ray workers import it cheaply, and nothing
below can reach up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "megatron", "megatron_vwlmm", "pipeline", "preprocessing")

CODE = f"""
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("vwlmm_data imported " + name)
        return None

sys.meta_path.insert(0, Blocked())
import vwlmm_data
names = [m.name for m in pkgutil.walk_packages(vwlmm_data.__path__, "vwlmm_data.")]
for name in names:
    importlib.import_module(name)
print(" ".join(sorted(names)))
"""


def test_every_vwlmm_data_module_imports_without_torch_megatron_or_upper_layers():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules = set(out.stdout.split())
    expected = {f"vwlmm_data.{p.stem}" for p in (REPO / "vwlmm_data").glob("*.py")
                if p.stem != "__init__"}
    assert modules == expected
