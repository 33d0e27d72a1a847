"""The driver of a preprocessing job: inputs -> scan -> dedup and plan -> unit tasks -> manifest.

The driver holds metadata proportional to the number of input files and units, never records:
scans, digests and dedup decisions live in the job's state folder (``preprocessing/job_state.py``),
written and read by tasks; the global dedup is a partitioned step (``preprocessing/dedup.py``,
``preprocessing/plan.py``); units are streamed from the plan with at most ``max_in_flight``
tasks in flight (``preprocessing/scheduling.py``); the manifest is merged from the unit records
as a stream (``preprocessing/finalize.py``). Units map 1:1 to output shards, so shard boundaries
and names depend only on the inputs and the config, never on the number of workers, on the
number of dedup partitions or on timing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

from tqdm import tqdm

from preprocessing import output_guard
from preprocessing.config import PreprocessConfig
from preprocessing.finalize import finalize
from preprocessing.job_state import JobState, check_inputs
from preprocessing.local_ray import private_local_ray
from preprocessing.plan import (InputFile, build_plan, default_partitions, file_unit, iter_units,
                                read_plan, task_unit)
from preprocessing.scheduling import bound_oom_retries, bounded_executor
from preprocessing.sources import get_source
from preprocessing.task_results import UnitDone
from preprocessing.tokenizer import tokenizer_identity
from preprocessing.worker import digest_unit, process_unit, scan_file
from vwlmm_data import hooks
from vwlmm_data import storage
from vwlmm_data.contract import MANIFEST_NAME, Manifest, load_manifest
from vwlmm_data.storage import FileInfo

log = logging.getLogger("vwlmm.preprocess")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vwlmm")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def _expanded(cfg: PreprocessConfig) -> list[FileInfo]:
    """Every file ``--input`` names, in order, with its size and version (``inputs.json``)."""
    infos, seen = [], set()
    for pattern in cfg.inputs:
        found = storage.expand_info(pattern, cfg.s3)
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        for info in found:
            if info.uri not in seen:
                seen.add(info.uri)
                infos.append(info)
    return infos


def _inputs(cfg: PreprocessConfig, expanded: list[FileInfo]) -> list[InputFile]:
    """The files the source reads, in order (a LAION tar carries its parquet as a unit field)."""
    return [InputFile(i, uri, fields) for i, (uri, fields)
            in enumerate(get_source(cfg.source).input_files([f.uri for f in expanded]))]


def _check_config(cfg: PreprocessConfig, state: JobState) -> bool:
    """Refuse to mix configs in one output folder; True when the job already finished."""
    if state.exists(state.config_uri):
        old = state.read_json(state.config_uri)
        if old["fingerprint"] != cfg.fingerprint():
            new = cfg.content_dict()
            diff = sorted(k for k in set(old["config"]) | set(new) if old["config"].get(k) != new.get(k))
            raise ValueError(f"{cfg.output} holds a job with a different config (fields {diff}); "
                             "use another --output or pass --overwrite")
    else:
        state.write_json(state.config_uri, {"fingerprint": cfg.fingerprint(),
                                            "config": cfg.content_dict()})
    return state.exists(storage.join(cfg.output, MANIFEST_NAME))


@contextlib.contextmanager
def _ray_session(cfg: PreprocessConfig):
    """The Ray this job runs on.

    Joins the cluster of ``--ray-address`` or ``RAY_ADDRESS`` (set by `ray job submit`; its
    token comes from the caller's environment), reuses a Ray already initialised in this
    process, or else starts a private single-machine Ray on 127.0.0.1 with its own token
    (``local_ray.private_local_ray``), stopped when the job ends.
    """
    import ray

    bound_oom_retries()  # before ray.init, which reads it
    if ray.is_initialized():
        yield ray
    elif cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address, log_to_driver=True, include_dashboard=False)
        yield ray
    else:
        with private_local_ray(log_to_driver=True):
            yield ray


# The only variable the driver passes to its tasks (test hooks, vwlmm_data/hooks.py). S3 settings
# travel in the config (``PreprocessConfig.s3``); credentials never leave the machine they are on:
# Ray records a runtime_env in its logs, State API and dashboard, so each worker reads S3 with the
# standard AWS credential chain of its own node (environment, shared credentials file, role).
FORWARDED_ENV = (hooks.HOOKS_ENV,)


def task_options() -> dict:
    """Ray task options for this job's tasks (a runtime_env only for ``FORWARDED_ENV``)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass
class RunSummary:
    """What a run did (the manifest says what the dataset is; None after ``--plan-only``)."""

    manifest: Manifest | None
    plan: dict | None = None  # the plan summary (records, units, duplicates, renames, batches)
    units_done: int = 0  # processed by this run
    units_skipped: int = 0  # already finished by an earlier, interrupted run
    seconds: float = 0.0  # wall time of the whole run (scan, plan, units, finalize)
    task_cpu_seconds: float = 0.0  # CPU time spent inside the unit tasks


def run(cfg: PreprocessConfig) -> RunSummary:
    """Run (or resume) the job; with ``plan_only``, stop once it is planned."""
    t_start = time.perf_counter()
    # Validate what can fail before anything is deleted or written (output_guard).
    tok_info = tokenizer_identity(cfg.tokenizer, cfg.tokenizer_backend)
    expanded = _expanded(cfg)
    files = _inputs(cfg, expanded)
    output_guard.check_output_allowed(cfg)  # before the lock file is written
    with output_guard.lock_output(cfg):  # a second job on this output is refused
        output_guard.prepare_output(cfg)
        state = JobState(cfg.output, cfg.s3)
        complete = _check_config(cfg, state)
        check_inputs(state, expanded, complete)
        if complete:
            log.info("%s is complete (manifest present); nothing to do", cfg.output)
            return RunSummary(load_manifest(cfg.output, cfg.s3), read_plan(state))
        output_guard.remove_stale_temps(cfg)
        with _ray_session(cfg) as ray:
            return _process(cfg, ray, files, tok_info, t_start)


def _plan(cfg: PreprocessConfig, run_tasks, state: JobState, files: list[InputFile]) -> dict:
    """Scan (and digest) the inputs, then the dedup and plan steps; the plan summary."""
    t0 = time.perf_counter()
    num_records, num_units = [0] * len(files), [0] * len(files)
    to_digest = []
    for r in run_tasks(scan_file, ((cfg, f) for f in files)):
        num_records[r.index], num_units[r.index] = r.num_records, r.num_units
        if cfg.dedup and r.units_to_digest is not None:  # digests that need the images
            to_digest.append((r.index, r.units_to_digest))
    to_digest.sort(key=lambda d: d[0])
    unit_fields = {"source": cfg.source}  # what every unit of the job carries
    jobs = ((cfg, files[i], c, task_unit(state, file_unit(files[i], loc, unit_fields)))
            for i, locators in to_digest for c, loc in enumerate(locators))
    for _ in run_tasks(digest_unit, jobs):
        pass
    del to_digest
    total = sum(num_records)
    partitions = cfg.dedup_partitions or default_partitions(total)
    log.info("scanned %d record(s) in %d file(s) (%.1fs); dedup in %d partition(s)", total,
             len(files), time.perf_counter() - t0, partitions)
    return build_plan(run_tasks, state, files, num_units, num_records, partitions=partitions,
                      dedup_on=cfg.dedup, unit_fields=unit_fields)


def _finished_units(state: JobState, num_units: int) -> bytearray:
    """done[i] = 1 when unit i's result record exists (one listing of the units folder)."""
    done = bytearray(num_units)
    for uri in storage.list_prefix(state.units_dir, state.s3):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < num_units:
            done[int(name[:-5])] = 1
    return done


def _process(cfg: PreprocessConfig, ray, files: list[InputFile], tok_info,
             t_start: float) -> RunSummary:
    """Plan (or reuse the plan) and process the units on ``ray``; finalize the manifest."""
    state = JobState(cfg.output, cfg.s3)
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = cfg.max_in_flight or 2 * workers
    counts = {"records": 0, "good": 0, "rejected": 0, "cpu": 0.0}

    def on_result(fn, result) -> None:
        hooks.fire("preprocess.task_done", module=fn.__module__)
        if isinstance(result, UnitDone):
            counts["records"] += result.num_records
            counts["good"] += result.num_samples
            counts["rejected"] += result.num_rejected
            counts["cpu"] += result.cpu_seconds

    run_tasks = bounded_executor(ray, limit, task_options(), on_result)
    t0 = time.perf_counter()
    summary = read_plan(state)
    if summary is None:
        log.info("planning %d input file(s) with %d worker(s), at most %d task(s) in flight",
                 len(files), workers, limit)
        summary = _plan(cfg, run_tasks, state, files)
    log.info("plan: %d record(s) in %d unit(s) from %d file(s); %d duplicate(s), %d renamed id(s) "
             "(%.1fs)", summary["num_records"], summary["num_units"], summary["num_files"],
             summary["num_duplicates"], summary["num_renames"], time.perf_counter() - t0)
    if cfg.plan_only:
        return RunSummary(None, summary, seconds=time.perf_counter() - t_start)

    done = _finished_units(state, summary["num_units"])
    skipped = sum(done)
    if skipped:
        log.info("resuming: %d of %d unit(s) already done", skipped, summary["num_units"])
    todo = ((cfg, task_unit(state, u)) for u in iter_units(state, summary)
            if not done[u["index"]])
    bar = tqdm(total=summary["num_units"], initial=skipped, unit="unit", disable=not cfg.progress,
               mininterval=1.0, desc="preprocess", dynamic_ncols=True)
    t1 = time.perf_counter()
    for _ in run_tasks(process_unit, todo):
        dt = max(time.perf_counter() - t1, 1e-9)
        bar.set_postfix(records_per_s=f"{counts['records'] / dt:.1f}", samples=counts["good"],
                        rejected=counts["rejected"], refresh=False)
        bar.update(1)
    bar.close()
    del done
    output_guard.remove_stale_temps(cfg)  # left by workers that died mid-write and were retried
    manifest = finalize(cfg, state, iter_units(state, summary), tok_info, _version())
    dt = time.perf_counter() - t1
    log.info("done: %d samples written, %d rejected %s, %d shard(s), %.1fs (%.1f samples/s)",
             manifest.num_samples, sum(manifest.rejected.values()), manifest.rejected,
             len(manifest.shards), dt, counts["good"] / max(dt, 1e-9))
    return RunSummary(manifest, summary, units_done=summary["num_units"] - skipped,
                      units_skipped=skipped, seconds=time.perf_counter() - t_start,
                      task_cpu_seconds=counts["cpu"])
