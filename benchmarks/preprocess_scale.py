"""Planning at scale: driver peak memory and wall time per record of `vwlmm-preprocess --plan-only`.

Synthetic img2dataset-style inputs (tars of 10,000 samples, ``.jpg`` + ``.txt`` + ``.json`` with
tiny payloads, and a parquet per tar; 1% exact duplicates across tars, 0.1% reused ids with other
content) are planned at each size: scan, global dedup and key collisions, units. The driver runs
as its own process joining one Ray head (its tasks run in Ray's worker processes), and reports
its own peak resident memory (``VmHWM`` of ``/proc/self/status`` at exit: that process alone).

Baseline: the code of a git revision (``--baseline-src``, e.g. a ``git worktree`` of HEAD before
this planner), its planning path driven the same way (scan tasks, then its in-driver
``plan_units``), on the same head in the same run. Both sides' decisions are hashed and must match.

    git worktree add --detach /tmp/vwlmm-baseline <revision>
    python benchmarks/preprocess_scale.py --data /tmp/vwlmm-scale --sizes 100000 1000000 4000000 \\
        --baseline-src /tmp/vwlmm-baseline --baseline-sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PER_TAR = 10_000
REPO = Path(__file__).resolve().parents[1]


def _record(j: int) -> tuple[str, bytes, str, str]:
    """(tar key, image bytes, caption, source id) of global record ``j``: 1% repeat the image and
    caption of a record ~1 tar earlier (exact duplicates), 0.1% reuse an earlier record's id."""
    src = j - PER_TAR - 7 if j % 100 == 99 and j >= PER_TAR + 7 else j
    key = f"{j // PER_TAR:05d}{j % PER_TAR:04d}"
    sid = f"{(j - 2 * PER_TAR - 3) // PER_TAR:05d}{(j - 2 * PER_TAR - 3) % PER_TAR:04d}" \
        if j % 1000 == 500 and j >= 2 * PER_TAR + 3 else key
    return key, b"\xff\xd8" + src.to_bytes(8, "little") + b"\xff\xd9", f"synthetic caption {src}", sid


def _member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes), as tarfile writes it for a regular
    file, built directly: ``TarInfo.tobuf`` dominates writing millions of tiny members."""
    head = bytearray(512)
    head[0:len(name)] = name.encode()
    head[100:108] = b"0000644\0"
    head[108:116] = head[116:124] = b"0000000\0"
    head[124:136] = b"%011o\0" % len(data)
    head[136:148] = b"%011o\0" % 1700000000
    head[148:156] = b" " * 8
    head[156:157] = b"0"
    head[257:265] = b"ustar\x0000"
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + data + b"\0" * (-len(data) % 512)


def _write_tar(folder: str, t: int) -> None:
    path = Path(folder, f"{t:05d}.tar")
    if path.exists():
        return
    rows, parts = [], []
    for j in range(t * PER_TAR, (t + 1) * PER_TAR):
        key, image, caption, sid = _record(j)
        meta = json.dumps({"key": sid, "caption": caption, "url": f"https://example.com/{j}.jpg"})
        for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", meta.encode())):
            parts.append(_member(f"{key}.{ext}", data))
        rows.append({"key": sid, "caption": caption, "url": f"https://example.com/{j}.jpg",
                     "similarity": 0.3})
    parts.append(b"\0" * 1024)  # end-of-archive
    pq.write_table(pa.Table.from_pylist(rows), Path(folder, f"{t:05d}.parquet"))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(parts))
    os.replace(tmp, path)


def write_inputs(data: Path, max_records: int, sizes: list[int]) -> dict[int, Path]:
    """The tars once under ``data/all``; per size, a folder of links to its first tars."""
    all_dir = data / "all"
    all_dir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_tar, [str(all_dir)] * (max_records // PER_TAR),
                      range(max_records // PER_TAR)))
    out = {}
    for n in sizes:
        d = data / f"n{n}"
        d.mkdir(exist_ok=True)
        for t in range(n // PER_TAR):
            for ext in ("tar", "parquet"):
                link = d / f"{t:05d}.{ext}"
                if not link.exists():
                    link.symlink_to(all_dir / f"{t:05d}.{ext}")
        out[n] = d
    return out


_MEASURED = """
import atexit, runpy, sys
def _peak():
    with open({status!r}, "w") as out, open("/proc/self/status") as st:
        out.write(st.read())
atexit.register(_peak)
sys.argv = {argv!r}
{body}
"""

_BASELINE = """
import dataclasses, hashlib, json
import ray
from preprocessing import runner
from preprocessing.config import PreprocessConfig
cfg = PreprocessConfig(**json.loads(sys.argv[1]))
ray.init(address=cfg.ray_address, runtime_env={{"env_vars": {{"PYTHONPATH": {src!r}}}}},
         log_to_driver=False, include_dashboard=False)
files = runner._inputs(cfg)
cfg_dict = dataclasses.asdict(cfg)
scans = runner._run_bounded(ray, runner._scan_file, [(cfg_dict, f) for f in files],
                            cfg.num_workers, {{}})
units, decisions = runner.plan_units(cfg, files, scans)
h = hashlib.sha256()
for d in decisions:
    h.update(json.dumps({{str(k): v for k, v in d.items()}}, sort_keys=True).encode() + b"\\n")
print(json.dumps({{"num_records": sum(u["num_records"] for u in units), "num_units": len(units),
                  "decisions_sha256": h.hexdigest()}}))
"""


def _peak_kib(status_file: Path) -> int:
    for line in status_file.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in {status_file}")


def _run_measured(body: str, argv: list[str], env: dict, work: Path,
                  name: str) -> tuple[float, int, str]:
    status = work / f"{name}.status"
    code = _MEASURED.format(status=str(status), argv=argv, body=body)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=work)  # not the repository: PYTHONPATH decides which code runs
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return wall, _peak_kib(status), res.stdout


def _decisions_sha256(output: Path) -> tuple[dict, str]:
    from preprocessing.job_state import JobState
    from preprocessing.plan import iter_units, read_plan, unit_decisions

    state = JobState(str(output))
    summary = read_plan(state)
    h = hashlib.sha256()
    for unit in iter_units(state, summary):
        h.update(json.dumps(unit_decisions(state, unit), sort_keys=True).encode() + b"\n")
    return summary, h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder for the synthetic inputs (kept, reused)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    p.add_argument("--baseline-src", help="source tree of the baseline revision")
    p.add_argument("--baseline-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    from preprocessing.local_ray import LocalRayHead, ray_env
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    data = Path(args.data)
    t0 = time.perf_counter()
    sizes = args.sizes + args.baseline_sizes
    folders = write_inputs(data, max(sizes), sizes)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s", flush=True)
    tok = str(build_mistral_hf_tokenizer(data / "tok"))
    work = Path(tempfile.mkdtemp(prefix="vwlmm-scale-", dir=data))
    results = []
    with LocalRayHead(ray_env(pythonpath=str(REPO)), num_cpus=args.workers) as head:
        runs = [("baseline", n) for n in args.baseline_sizes if args.baseline_src] + \
               [("planner", n) for n in args.sizes]
        for side, n in runs:
            out = work / f"{side}-{n}"
            inputs = [str(folders[n] / "*.tar"), str(folders[n] / "*.parquet")]
            if side == "planner":
                argv = ["vwlmm-preprocess", "--source", "laion", "--input", *inputs, "--tokenizer", tok,
                        "--output", str(out), "--plan-only", "--num-workers", str(args.workers),
                        "--samples-per-shard", str(args.samples_per_shard), "--no-progress",
                        "--ray-address", head.address]
                body = "runpy.run_module('preprocessing.cli', run_name='__main__')"
                wall, peak, _ = _run_measured(body, argv, head.env, work, f"{side}-{n}")
                summary, sha = _decisions_sha256(out)
                state_files = sum(1 for _ in (out / "_state").rglob("*") if _.is_file())
                row = {"num_records": summary["num_records"], "num_units": summary["num_units"],
                       "decisions_sha256": sha, "state_files": state_files,
                       "duplicates": summary["num_duplicates"], "renames": summary["num_renames"]}
            else:
                cfg = {"source": "laion", "inputs": inputs, "tokenizer": tok, "output": str(out),
                       "num_workers": args.workers, "samples_per_shard": args.samples_per_shard,
                       "ray_address": head.address, "progress": False}
                env = {**head.env, "PYTHONPATH": args.baseline_src}
                body = _BASELINE.format(src=args.baseline_src)
                wall, peak, stdout = _run_measured(body, ["baseline", json.dumps(cfg)], env, work,
                                                   f"{side}-{n}")
                row = json.loads(stdout.strip().splitlines()[-1])
            row.update(side=side, size=n, wall_s=round(wall, 2), peak_rss_mib=round(peak / 1024, 1),
                       us_per_record=round(wall / n * 1e6, 2),
                       records_per_s_per_core=round(n / wall / args.workers))
            results.append(row)
            print(json.dumps(row), flush=True)
    planner = {r["size"]: r for r in results if r["side"] == "planner"}
    for r in results:
        if r["side"] == "baseline" and r["size"] in planner:
            same = r["decisions_sha256"] == planner[r["size"]]["decisions_sha256"]
            print(f"size {r['size']}: decisions identical to the baseline: {same}")
    if len(planner) > 1:
        lo, hi = planner[min(planner)], planner[max(planner)]
        print(f"planner {min(planner)} -> {max(planner)} records: peak RSS x"
              f"{hi['peak_rss_mib'] / lo['peak_rss_mib']:.2f}, wall per record x"
              f"{hi['us_per_record'] / lo['us_per_record']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
