"""Draw a run's loss curves as a PNG: ``python -m pipeline.plot <run dir> [-o out.png]``.

Reads ``<run dir>/metrics.jsonl`` (written by the trainer every step) and plots lm_loss,
vm_loss and total loss against the iteration, with validation points when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

from pipeline.metrics import METRICS_FILE


def read_metrics(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} a training run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = {}
    for r in records:  # a resumed run re-logs the iterations after its checkpoint: keep the last
        if r.get("split") == "train":
            train[r["iteration"]] = r
    # The last validation record of each iteration too (a resumed run logs them again).
    valid = list({r["iteration"]: r for r in records if r.get("split") == "valid"}.values())
    iters = sorted(train)
    # Two panels: the KL (vm_loss) is orders of magnitude below the CE and would look flat on
    # a shared axis, so it gets its own log-scale panel.
    fig, (ax_lm, ax_vm) = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((ax_lm, ("lm_loss", "total_loss"), "linear"), (ax_vm, ("vm_loss",), "log"))
    for ax, keys, scale in panels:
        for key in keys:
            ax.plot(iters, [train[i].get(key) for i in iters],
                    "--" if key == "total_loss" else "-", label=key)
            pts = [(r["iteration"], r[f"valid_{key}"]) for r in valid if f"valid_{key}" in r]
            if pts:
                ax.plot(*zip(*pts), "o", label=f"valid_{key}")
        ax.set_yscale(scale)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_lm.set_ylabel("loss")
    fig.suptitle(f"VW-LMM training: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plot",
        description="Plot lm_loss / vm_loss / total loss of a training run (reads "
                    "<run_dir>/metrics.jsonl) into a PNG.")
    parser.add_argument("run_dir", type=Path, help="the run folder (train config's run_dir)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output PNG (default: <run_dir>/loss.png)")
    args = parser.parse_args(argv)
    out = plot(args.run_dir, args.out or args.run_dir / "loss.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
