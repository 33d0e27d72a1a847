"""cluster/slurm/ray_preprocess.sbatch: a Slurm-started Ray cluster runs the real preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cluster.cluster_jobs import RAY_SBATCH, job_env, job_port, processes_mentioning, read
from tests.cluster.slurm_harness import job_id
from vwlmm_data.contract import FORMATS


def test_preprocessing_on_slurm_started_ray(one_node_preprocess, preprocess_inputs):
    run = one_node_preprocess  # the session's one-node job (tests/cluster/conftest.py)
    out, job = run.out, run.job
    assert run.returncode == 0, out

    # The relative --output landed in the submit directory, not in Ray's job directory.
    manifest = json.loads((run.dataset / "manifest.json").read_text())
    assert preprocess_inputs.expected_ok > 0
    assert manifest["num_samples"] == preprocess_inputs.expected_ok, (manifest, out)
    for fmt in FORMATS:  # --format both: each format's shards hold every sample
        assert sum(s["num_samples"] for s in manifest["shards"] if s["format"] == fmt) == \
            preprocess_inputs.expected_ok, (fmt, manifest)
    # The job ran on the Ray cluster this Slurm job started (its job-id-derived GCS port), not
    # on a Ray it started itself.
    gcs = f"127.0.0.1:{job_port(job, 1)}"
    assert f"Connecting to existing Ray cluster at address: {gcs}" in out, out
    assert f"vwlmm-preprocess-{job}-0: SUCCEEDED" in out, out
    # Teardown: no Ray process of this job survives, and its temp dir is gone after success.
    assert not processes_mentioning(f"/tmp/ray-vwlmm-{job}")
    assert not Path(f"/tmp/ray-vwlmm-{job}").exists()


def test_failed_preprocessing_fails_the_job_and_stops_ray(slurm, tmp_path):
    res = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/job.out", str(RAY_SBATCH),
                        "--source", "laion", "--input", str(tmp_path / "missing-*.tar"),
                        "--tokenizer", str(tmp_path / "no-tokenizer"), "--template", "plain",
                        "--output", str(tmp_path / "out")],
                       env=job_env(), cwd=tmp_path, timeout=400)
    out = read(tmp_path / "job.out")
    job = job_id(res)
    assert res.returncode != 0, out
    assert f"vwlmm-preprocess-{job}-0: FAILED" in out, out
    assert not processes_mentioning(f"/tmp/ray-vwlmm-{job}"), out
    assert not (tmp_path / "out/manifest.json").exists()
    # Ray's temp dir is kept for its logs after a failure (then removed: the test made it).
    kept = Path(f"/tmp/ray-vwlmm-{job}")
    assert kept.is_dir() and f"Ray logs kept in {kept}" in out, out
    shutil.rmtree(kept)
