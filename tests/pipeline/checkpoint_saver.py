"""A process that saves checkpoints through ``megatron_vwlmm/checkpoint/layout.py`` exactly as
the trainer's rank 0 does (stage, fill, commit, prune), for the crash tests to SIGKILL.

The "fill" copies a prepared torch_dist checkpoint of the same iteration into the staging
folder (the tests build them once with megatron), so every committed folder is a real,
loadable checkpoint whose tensor values say which iteration it holds. Standard library only:
it starts in a fraction of a second, so many kills fit in a test.

    python -m tests.pipeline.checkpoint_saver ROOT TEMPLATES --run-id R --iterations 2,4,6
        [--keep-last K] [--kill-at SAVE:STEP]

``--kill-at 1:displaced`` SIGKILLs the process when the second save reaches the step
``displaced`` (``layout.commit``'s names, plus ``written`` after the fill). ``--step-by-step``
prints ``step SAVE NAME`` at each step and waits for a line on stdin before going on, so a test
can kill it at an exact step it chooses while the process runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from megatron_vwlmm.checkpoint import layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("templates", type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--iterations", required=True)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--kill-at")
    parser.add_argument("--step-by-step", action="store_true")
    args = parser.parse_args()
    kill_save, kill_step = (args.kill_at.split(":") if args.kill_at else (None, None))
    for index, iteration in enumerate(int(i) for i in args.iterations.split(",")):
        def step(name: str, _index=index) -> None:
            if str(_index) == kill_save and name == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.step_by_step:
                print(f"step {_index} {name}", flush=True)
                sys.stdin.readline()

        tmp = layout.stage(args.root, layout.Marker(args.run_id, iteration), on_step=step)
        shutil.copytree(args.templates / layout.checkpoint_name(iteration), tmp,
                        dirs_exist_ok=True)
        step("written")
        final = layout.commit(args.root, tmp, on_step=step)
        layout.prune(args.root, final, args.keep_last, on_step=step)
        print(f"saved {final.name}", flush=True)


if __name__ == "__main__":
    main()
