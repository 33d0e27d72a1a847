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
    for r in records:  # a resumed run re-logs nothing, but keep the last value per iteration
        if r.get("split") == "train":
            train[r["iteration"]] = r
    valid = [r for r in records if r.get("split") == "valid"]
    iters = sorted(train)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("lm_loss", "-"), ("vm_loss", "-"), ("total_loss", "--")):
        ax.plot(iters, [train[i].get(key) for i in iters], style, label=key)
    for key in ("valid_lm_loss", "valid_vm_loss"):
        pts = [(r["iteration"], r[key]) for r in valid if key in r]
        if pts:
            ax.plot(*zip(*pts), "o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"VW-LMM training: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
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
