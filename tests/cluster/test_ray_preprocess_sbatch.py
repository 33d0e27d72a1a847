"""cluster/slurm/ray_preprocess.sbatch: a Slurm-started Ray cluster runs the real preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from tests.cluster.cluster_jobs import RAY_SBATCH, job_env, read, require_module


def ray_processes_under(path: str):
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(path in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def test_preprocessing_on_slurm_started_ray(slurm, tmp_path):
    require_module("preprocessing.cli", "the preprocessing job (issue 3)")
    from preprocessing.fixtures import FIXTURE_FILTERS, write_demo_dataset
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    demo = write_demo_dataset(tmp_path / "raw", variants=False, max_side=64)
    tokenizer = build_mistral_hf_tokenizer(tmp_path / "tokenizer")
    filters = [a for k, v in FIXTURE_FILTERS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    # Relative output path: it must land in the submit directory, not in Ray's job directory.
    args = ["--source", "laion", "--input", *demo.laion_inputs, "--tokenizer", str(tokenizer),
            "--template", "plain", "--output", "dataset", "--format", "both",
            "--image-size", "56", "--max-seq-len", "256", "--samples-per-shard", "4",
            "--no-progress", *filters]
    res = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/job.out", str(RAY_SBATCH),
                        *args], env=job_env(), cwd=tmp_path, timeout=400)
    out = read(tmp_path / "job.out")
    job = res.stdout.strip().split(";")[0]
    assert res.returncode == 0, out

    manifest = json.loads((tmp_path / "dataset/manifest.json").read_text())
    expected_ok = sum(v == "ok" for v in demo.laion_expected.values())
    assert expected_ok > 0
    assert manifest["num_samples"] == expected_ok, (manifest, out)
    assert sum(s["num_samples"] for s in manifest["shards"]) in (expected_ok, 2 * expected_ok)
    # The job ran on the Ray cluster this Slurm job started (its job-id-derived GCS port), not
    # on a Ray it started itself.
    gcs_port = 20000 + 10 * (int(job) % 1200) + 1
    assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{gcs_port}" in out, out
    assert f"vwlmm-preprocess-{job}-0: SUCCEEDED" in out, out
    # Teardown: no Ray process of this job survives, and its temp dir is gone after success.
    assert not ray_processes_under(f"/tmp/ray-vwlmm-{job}")
    assert not Path(f"/tmp/ray-vwlmm-{job}").exists()


def test_failed_preprocessing_fails_the_job_and_stops_ray(slurm, tmp_path):
    require_module("preprocessing.cli", "the preprocessing job (issue 3)")
    res = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/job.out", str(RAY_SBATCH),
                        "--source", "laion", "--input", str(tmp_path / "missing-*.tar"),
                        "--tokenizer", str(tmp_path / "no-tokenizer"), "--template", "plain",
                        "--output", str(tmp_path / "out")],
                       env=job_env(), cwd=tmp_path, timeout=400)
    out = read(tmp_path / "job.out")
    job = res.stdout.strip().split(";")[0]
    assert res.returncode != 0, out
    assert f"vwlmm-preprocess-{job}-0: FAILED" in out, out
    assert not ray_processes_under(f"/tmp/ray-vwlmm-{job}"), out
    assert not (tmp_path / "out/manifest.json").exists()
