"""The driver of a preprocessing job: scan -> plan (global dedup) -> Ray tasks -> manifest.

The driver holds only per-record keys and 16-byte digests (for exact dedup across the whole
job), never samples or images. Work is cut into *units* (a slice of one input file, at most
``samples_per_shard`` records) that map 1:1 to output shards, so shard boundaries and names
depend only on the inputs and the config, never on the number of workers or on timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

from tqdm import tqdm

from preprocessing import storage
from preprocessing.config import PreprocessConfig
from preprocessing.local_ray import private_local_ray
from preprocessing.schema import (FORMAT_VERSION, IGNORE_INDEX, IMAGE_TOKEN_ID, MANIFEST_NAME,
                                  REJECTS_NAME)
from preprocessing.sources import laion, llava
from preprocessing.tokenizer import tokenizer_identity
from preprocessing.worker import CRASH_ENV, STATE_DIR, process_unit, unit_record_uri
from preprocessing.writers import StagedFile

log = logging.getLogger("vwlmm.preprocess")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vwlmm")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


@dataclass
class _InputFile:
    index: int
    uri: str
    parquet: str | None = None


def _inputs(cfg: PreprocessConfig) -> list[_InputFile]:
    files: list[str] = []
    for pattern in cfg.inputs:
        found = storage.expand(pattern)
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files += [f for f in found if f not in files]
    if cfg.source == "laion":
        return [_InputFile(i, t, p) for i, (t, p) in enumerate(laion.pair_inputs(files))]
    return [_InputFile(i, f) for i, f in enumerate(files)]


def _scan_file(cfg_dict: dict, f: _InputFile) -> list[dict]:
    """Scan one input file (in a worker), caching the result under the state folder."""
    cfg = PreprocessConfig(**cfg_dict)
    storage.configure(cfg.s3_endpoint)
    cache = storage.join(cfg.output, STATE_DIR, "scan", f"{f.index:06d}.json")
    if storage.exists(cache):
        cached = json.loads(storage.read_bytes(cache))
        if cached["file"] == f.uri:
            return cached["records"]
    if cfg.source == "laion":
        if not storage.exists(f.uri):
            raise FileNotFoundError(f"input {f.uri} does not exist")
        records = laion.scan(f.uri)
    else:
        records = llava.split(f.uri, _records_prefix(cfg, f), cfg.samples_per_shard)
    storage.write_bytes(cache, json.dumps({"file": f.uri, "records": records}).encode())
    return records


def _records_prefix(cfg: PreprocessConfig, f: _InputFile) -> str:
    return storage.join(cfg.output, STATE_DIR, "records", f"{f.index:06d}")


def _digest_unit(cfg_dict: dict, f: _InputFile, chunk: int) -> list:
    """LLaVA dedup digests of one unit file (reads its images), cached like the scan."""
    cfg = PreprocessConfig(**cfg_dict)
    storage.configure(cfg.s3_endpoint)
    cache = storage.join(cfg.output, STATE_DIR, "digests", f"{f.index:06d}-{chunk:06d}.json")
    if storage.exists(cache):
        return json.loads(storage.read_bytes(cache))
    found = llava.digests(f"{_records_prefix(cfg, f)}-{chunk:06d}.jsonl",
                          chunk * cfg.samples_per_shard, cfg.image_root, f.uri.rsplit("/", 1)[-1])
    storage.write_bytes(cache, json.dumps(found).encode())
    return found


def plan_units(cfg: PreprocessConfig, files: list[_InputFile], scans: list[list[dict]]):
    """Cut files into units and decide duplicates / key collisions in global input order."""
    units, decisions = [], []
    first_key_of: dict[str, str] = {}
    used_keys: set[str] = set()
    sps = cfg.samples_per_shard
    for f, records in zip(files, scans):
        for c in range(0, len(records), sps):
            chunk = records[c:c + sps]
            unit = {"index": len(units), "source": cfg.source, "file": f.uri,
                    "num_records": len(chunk)}
            if cfg.source == "laion":
                unit.update(parquet=f.parquet, start=chunk[0]["start"], end=chunk[-1]["end"])
            else:
                unit.update(records_uri=f"{_records_prefix(cfg, f)}-{c // sps:06d}.jsonl", first_index=c,
                            origin=f.uri.rsplit("/", 1)[-1])
            dec: dict[int, list] = {}
            for i, r in enumerate(chunk):
                digest = r.get("digest")
                if cfg.dedup and digest and digest in first_key_of:
                    dec[i] = ["duplicate", first_key_of[digest]]
                    continue
                key, n = r["key"], 1
                while key in used_keys:  # same id twice with different content: keep both
                    key, n = f"{r['key']}_{n}", n + 1
                if key != r["key"]:
                    dec[i] = ["rename", key]
                used_keys.add(key)
                if digest:
                    first_key_of.setdefault(digest, key)
            units.append(unit)
            decisions.append(dec)
    return units, decisions


def _check_state(cfg: PreprocessConfig) -> bool:
    """Refuse to mix configs in one output folder; True when the job already finished."""
    state = storage.join(cfg.output, STATE_DIR, "config.json")
    if storage.exists(state):
        old = json.loads(storage.read_bytes(state))
        if old["fingerprint"] != cfg.fingerprint():
            new = cfg.content_dict()
            diff = sorted(k for k in set(old["config"]) | set(new) if old["config"].get(k) != new.get(k))
            raise ValueError(f"{cfg.output} holds a job with a different config (fields {diff}); "
                             "use another --output or pass --overwrite")
    else:
        storage.write_bytes(state, json.dumps({"fingerprint": cfg.fingerprint(),
                                               "config": cfg.content_dict()}, sort_keys=True).encode())
    return storage.exists(storage.join(cfg.output, MANIFEST_NAME))


def _remove_stale_temps(output: str) -> None:
    """Temp files of a killed run (local outputs only; S3 staging lives in the worker's /tmp)."""
    if storage.is_s3(output) or not os.path.isdir(output):
        return
    for path in storage.list_prefix(output):
        if os.path.basename(path).startswith(".tmp-"):
            os.unlink(path)


@contextlib.contextmanager
def _ray_session(cfg: PreprocessConfig):
    """The Ray this job runs on.

    Joins the cluster of ``--ray-address`` or ``RAY_ADDRESS`` (set by `ray job submit`; its
    token comes from the caller's environment), reuses a Ray already initialised in this
    process, or else starts a private single-machine Ray on 127.0.0.1 with its own token
    (``local_ray.private_local_ray``), stopped when the job ends.
    """
    import ray

    if ray.is_initialized():
        yield ray
    elif cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address, log_to_driver=True, include_dashboard=False)
        yield ray
    else:
        with private_local_ray(log_to_driver=True, include_dashboard=False):
            yield ray


def _run_bounded(ray, fn, args_list, limit: int, options: dict, on_done=lambda r: r) -> list:
    """Submit tasks keeping at most ``limit`` in flight; ``on_done(result)``s in submission order."""
    remote = ray.remote(fn).options(num_cpus=1, max_retries=3, **options)
    results: list = [None] * len(args_list)
    pending: dict = {}
    nxt = 0
    while nxt < len(args_list) or pending:
        while nxt < len(args_list) and len(pending) < limit:
            pending[remote.remote(*args_list[nxt])] = nxt
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            results[i] = on_done(ray.get(ref))
    return results


# Passed from the driver to the tasks: workers run with the Ray node's environment, which need not
# hold the submitting user's S3 credentials.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", CRASH_ENV)


def _task_env() -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _summary(unit_result: dict) -> dict:
    """A unit's result without its reject list (re-read from storage when finalizing)."""
    return {k: v for k, v in unit_result.items() if k != "rejects"}


@dataclass
class RunSummary:
    """What a run did (the manifest says what the dataset is)."""

    manifest: dict
    units_done: int = 0  # processed by this run
    units_skipped: int = 0  # already finished by an earlier, interrupted run
    seconds: float = 0.0  # wall time of the whole run (scan, units, finalize)
    task_cpu_seconds: float = 0.0  # CPU time spent inside the unit tasks


def run(cfg: PreprocessConfig) -> RunSummary:
    """Run (or resume) the job."""
    t_start = time.perf_counter()
    storage.configure(cfg.s3_endpoint)
    if cfg.overwrite:
        storage.remove_tree(cfg.output)
    if _check_state(cfg):
        log.info("%s is complete (manifest present); nothing to do", cfg.output)
        return RunSummary(json.loads(storage.read_bytes(storage.join(cfg.output, MANIFEST_NAME))))
    _remove_stale_temps(cfg.output)
    tok_info = tokenizer_identity(cfg.tokenizer)
    files = _inputs(cfg)
    with _ray_session(cfg) as ray:
        return _process(cfg, ray, files, tok_info, t_start)


def _process(cfg: PreprocessConfig, ray, files, tok_info, t_start: float) -> RunSummary:
    """Scan, dedup, plan and process the units on ``ray``; finalize the manifest."""
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    cfg_dict = dataclasses.asdict(cfg)
    t0 = time.perf_counter()
    log.info("scanning %d input file(s) with %d worker(s)", len(files), workers)
    scans = _run_bounded(ray, _scan_file, [(cfg_dict, f) for f in files], workers, _task_env())
    if cfg.source == "llava" and cfg.dedup:
        jobs = [(cfg_dict, f, c) for f, recs in zip(files, scans)
                for c in range(-(-len(recs) // cfg.samples_per_shard))]
        found = _run_bounded(ray, _digest_unit, jobs, workers, _task_env())
        for (_, f, c), chunk_digests in zip(jobs, found):
            for i, d in enumerate(chunk_digests):
                scans[f.index][c * cfg.samples_per_shard + i]["digest"] = d
    units, decisions = plan_units(cfg, files, scans)
    total = sum(u["num_records"] for u in units)
    log.info("%d records in %d unit(s) (scan %.1fs)", total, len(units), time.perf_counter() - t0)

    results: dict[int, dict] = {}
    todo = []
    for u, d in zip(units, decisions):
        uri = unit_record_uri(cfg.output, u["index"])
        if storage.exists(uri):
            results[u["index"]] = _summary(json.loads(storage.read_bytes(uri)))
        else:
            todo.append((cfg_dict, u, d))
    bar = tqdm(total=total, unit="rec", disable=not cfg.progress, mininterval=1.0,
               desc="preprocess", dynamic_ncols=True)
    counts = {"good": 0, "rejected": 0, "cpu": 0.0}

    def tick(r: dict) -> None:
        counts["good"] += r["num_samples"]
        counts["cpu"] += r.pop("cpu_seconds", 0.0)
        counts["rejected"] += len(r["rejects"])
        rate = counts["good"] / max(time.perf_counter() - t1, 1e-9)
        bar.set_postfix(samples=counts["good"], rejected=counts["rejected"],
                        samples_per_s=f"{rate:.1f}", refresh=False)
        bar.update(r["num_records"])
        return _summary(r)

    for r in results.values():
        bar.update(r["num_records"])
    if results:
        log.info("resuming: %d of %d unit(s) already done", len(results), len(units))
    t1 = time.perf_counter()
    options = _task_env()
    for r in _run_bounded(ray, process_unit, todo, workers, options, tick):
        results[r["index"]] = r
    bar.close()
    _remove_stale_temps(cfg.output)  # left by workers that died mid-write and were retried
    manifest = _finalize(cfg, tok_info, [results[u["index"]] for u in units])
    dt = time.perf_counter() - t1
    log.info("done: %d samples written, %d rejected %s, %d shard(s), %.1fs (%.1f samples/s)",
             manifest["num_samples"], sum(manifest["rejected"].values()), manifest["rejected"],
             len(manifest["shards"]), dt, counts["good"] / max(dt, 1e-9))
    return RunSummary(manifest, units_done=len(todo), units_skipped=len(units) - len(todo),
                      seconds=time.perf_counter() - t_start, task_cpu_seconds=counts["cpu"])


def _finalize(cfg: PreprocessConfig, tok_info, unit_results: list[dict]) -> dict:
    """Write rejects.jsonl and, last, manifest.json.

    Reject records are streamed from the unit records on storage into a staged file, so the
    driver never holds all of them (LAION-scale jobs reject tens of millions of records).
    """
    rejected: dict[str, int] = {}
    shards = []
    stats = {"num_records": 0, "num_tokens": 0, "min_tokens": None, "max_tokens": 0,
             "num_text_tokens": 0, "num_supervised_tokens": 0, "num_images": 0, "num_text_only": 0}
    rejects_file = StagedFile(storage.join(cfg.output, REJECTS_NAME))
    for r in unit_results:
        for rej in json.loads(storage.read_bytes(unit_record_uri(cfg.output, r["index"])))["rejects"]:
            rejected[rej["reason"]] = rejected.get(rej["reason"], 0) + 1
            rejects_file.file.write(json.dumps(rej, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        shards += r["shards"]
        stats["num_records"] += r["num_records"]
        st = r["stats"]
        for k in ("num_tokens", "num_text_tokens", "num_supervised_tokens", "num_images", "num_text_only"):
            stats[k] += st[k]
        stats["max_tokens"] = max(stats["max_tokens"], st["max_tokens"])
        if st["min_tokens"] is not None:
            stats["min_tokens"] = st["min_tokens"] if stats["min_tokens"] is None else min(stats["min_tokens"], st["min_tokens"])
    rejects_file.commit()
    num_samples = sum(r["num_samples"] for r in unit_results)
    stats["mean_tokens"] = stats["num_tokens"] / num_samples if num_samples else 0.0
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_samples": num_samples,
        "rejected": dict(sorted(rejected.items())),
        "shards": shards,
        "statistics": stats,
        "tokenizer": {"name_or_path": tok_info.name_or_path, "sha256": tok_info.sha256,
                      "vocab_size": tok_info.vocab_size},
        "template": cfg.template,
        "image_token_id": IMAGE_TOKEN_ID,
        "ignore_index": IGNORE_INDEX,
        "image_size": cfg.image_size,
        "image_mode": cfg.image_mode,
        "num_patches_per_image": cfg.num_patches,
        "max_seq_len": cfg.max_seq_len,
        "formats": list(cfg.formats),
        "config": cfg.content_dict(),
        "vwlmm_version": _version(),
    }
    # The manifest is committed last: its presence means the whole dataset is complete.
    storage.write_bytes(storage.join(cfg.output, MANIFEST_NAME),
                        json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest
