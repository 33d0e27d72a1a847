"""``python -m preprocessing.cli``, with every unit task first noting where it runs.

The multi-node tests run it as ray_preprocess.sbatch's entrypoint (VWLMM_PREPROCESS_CMD) to see
which Ray node processed which unit: each unit task writes
``$VWLMM_TEST_TASK_MARKS/unit-<index>-<pid>-start.json`` ({"unit", "node_ip", "pid", "time",
"event"}) when it starts, waits ``$VWLMM_TEST_TASK_DELAY`` seconds (default 0) so that a test
can kill a node while tasks run there, runs the real ``process_unit`` (the dataset is
unchanged) and writes the same mark with "event": "end".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List

from preprocessing.worker import process_unit

MARKS_ENV = "VWLMM_TEST_TASK_MARKS"
DELAY_ENV = "VWLMM_TEST_TASK_DELAY"


def _mark(unit: dict, event: str) -> None:
    import ray

    mark = {"unit": unit["index"], "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(), "time": time.time(), "event": event}
    name = f"unit-{unit['index']:06d}-{os.getpid()}-{event}.json"
    tmp = Path(os.environ[MARKS_ENV], f".{name}")
    tmp.write_text(json.dumps(mark))
    tmp.rename(tmp.with_name(name))  # readers never see half a mark


def located_process_unit(cfg, unit: dict):
    _mark(unit, "start")
    time.sleep(float(os.environ.get(DELAY_ENV, "0")))
    result = process_unit(cfg, unit)
    _mark(unit, "end")
    return result


def read_marks(marks_dir: Path) -> List[dict]:
    """The marks unit tasks wrote, in time order."""
    return sorted((json.loads(p.read_text()) for p in Path(marks_dir).glob("unit-*.json")),
                  key=lambda m: m["time"])


if __name__ == "__main__":
    from preprocessing import cli, runner
    from tests.cluster import located_preprocess

    # The driver submits runner.process_unit. Imported under its module name (not __main__),
    # the replacement is pickled by reference and every node imports it from the shared
    # repository (cluster/env.sh puts the repository on PYTHONPATH).
    runner.process_unit = located_preprocess.located_process_unit
    sys.exit(cli.main())
