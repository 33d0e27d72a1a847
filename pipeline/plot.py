"""Draw a run's loss curves as a PNG: ``python -m pipeline.plot <run dir> [-o out.png]``.

Reads ``<run dir>/metrics.jsonl`` (written by the trainer every step) and plots lm_loss,
vm_loss and total loss against the iteration, with validation points when present, and, when
``vwlmm-eval`` evaluated checkpoints of the run, a third panel with each benchmark's scores
against the same iteration axis.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

from pipeline.metrics import EVAL_SPLIT, read_metrics


def benchmark_curves(records: List[Dict]) -> Dict[str, List[Tuple[int, float]]]:
    """``task/metric`` -> [(iteration, score)] from the eval records (the last record of each
    task and iteration: a re-evaluated checkpoint replaces its earlier scores)."""
    last = {(r["task"], r["iteration"]): r for r in records if r.get("split") == EVAL_SPLIT}
    curves: Dict[str, List[Tuple[int, float]]] = {}
    for (task, iteration), r in sorted(last.items(), key=lambda kv: kv[0][1]):
        for key, value in r.items():
            if key != "iteration" and isinstance(value, (int, float)) and \
                    not isinstance(value, bool):
                curves.setdefault(f"{task}/{key}", []).append((iteration, value))
    return curves


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
    curves = benchmark_curves(records)
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(16.5 if curves else 11, 4.5))
    ax_lm, ax_vm = axes[0], axes[1]
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
    if curves:
        ax_eval = axes[2]
        for name, points in sorted(curves.items()):
            ax_eval.plot(*zip(*points), "o-", label=name)
        ax_eval.set_xlabel("iteration")
        ax_eval.set_ylabel("benchmark score (vwlmm-eval)")
        ax_eval.grid(alpha=0.3)
        ax_eval.legend()
    fig.suptitle(f"VW-LMM training: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plot",
        description="Plot lm_loss / vm_loss / total loss of a training run, and the benchmark "
                    "scores vwlmm-eval recorded for its checkpoints (reads "
                    "<run_dir>/metrics.jsonl) into a PNG.")
    parser.add_argument("run_dir", type=Path, help="the run folder (train config's run_dir)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output PNG (default: <run_dir>/loss.png)")
    args = parser.parse_args(argv)
    out = plot(args.run_dir, args.out or args.run_dir / "loss.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
