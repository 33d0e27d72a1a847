"""Wait until the Ray cluster that ray_preprocess.sbatch started can take the job.

Ready = the Jobs API answers on the dashboard (the head is up and accepts the job's token, which
Ray's clients read from RAY_AUTH_TOKEN) and ``--nodes`` nodes are alive. One process polls for
the whole start-up: a `ray` CLI call per poll would import Ray each time, seconds of CPU on the
head node while it is starting.

    python ray_ready.py --dashboard URL --gcs HOST:PORT --nodes N --timeout S --head-pid PID

Exit code 0 when ready; 1, with the reason on stderr, when the head step (``--head-pid``, its
srun) ended or the timeout passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_ready(dashboard: str, gcs: str, nodes: int, timeout: float, head_pid: int) -> str:
    """'' once ready, else why not."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    jobs_api, alive, last_error = False, 0, ""
    while time.monotonic() < deadline:
        if not _alive(head_pid):
            return "the Ray head exited during start-up (see above)"
        try:
            if not jobs_api:
                JobSubmissionClient(dashboard)  # checks that the Jobs API answers
                jobs_api = True
            alive = sum(n.state == "ALIVE" for n in list_nodes(address=gcs, limit=10000))
            if alive >= nodes:
                return ""
        except Exception as exc:  # not up yet: the next poll tells
            last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        time.sleep(1)
    if not jobs_api:
        return f"Ray head not answering at {dashboard} after {timeout:.0f}s ({last_error})"
    return f"only {alive} of {nodes} Ray nodes joined in {timeout:.0f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", required=True, help="the head's dashboard URL")
    parser.add_argument("--gcs", required=True, help="the head's GCS address, host:port")
    parser.add_argument("--nodes", type=int, required=True, help="Ray nodes to wait for")
    parser.add_argument("--timeout", type=float, required=True, help="seconds")
    parser.add_argument("--head-pid", type=int, required=True,
                        help="PID of the srun running the head (give up when it ends)")
    args = parser.parse_args()
    why = wait_ready(args.dashboard, args.gcs, args.nodes, args.timeout, args.head_pid)
    if why:
        print(why, file=sys.stderr)
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
