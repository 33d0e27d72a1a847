"""A trainer that fails while its loader workers run still exits.

The loaders' workers ignore SIGTERM (pipeline/data/loader.py), the signal multiprocessing ends
daemonic children with at interpreter exit before joining them. A rank whose step raised (e.g.
a collective timed out because a peer node died) must exit all the same, or its job hangs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAILING_RANK = """
from torch.utils.data import DataLoader
from pipeline.data import loader

batches = iter(DataLoader(range(64), num_workers=1, worker_init_fn=loader._worker_init))
next(batches)
raise RuntimeError("the step failed")
"""


def test_a_failing_process_with_loader_workers_exits():
    proc = subprocess.run([sys.executable, "-c", FAILING_RANK], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    # The step's error is the only one: the workers' end is not reported as a loader failure.
    assert proc.stderr.count("Error") == 1 and "the step failed" in proc.stderr, proc.stderr
