"""What a preprocessing job may do to its ``--output``: claim it, clear it, clean up after itself.

A job marks the folder it writes as its own (``_state/vwlmm-dataset.json``) before its first
write, and deletes only inside folders that carry that mark, and there only the files of its
own layout (``job_layout_files``): ``manifest.json``, ``rejects.jsonl``, ``shard-NNNNNN.*``
(beside the manifest or in ``webdataset/`` / ``arrow/``), Energon's ``.nv-meta/`` and
``.tar.idx`` files, the ``_state/`` folder, and ``StagedFile`` temp files. Anything else a user
put there is left alone.

Everything that can be checked is checked before the first byte is deleted or written:
``--overwrite`` refuses a bucket root, a filesystem root, a top-level or home folder
(``storage.protected_reason``), an input, the image root or the tokenizer folder, or a folder
above one of them, and a non-empty folder without the mark. The tokenizer and the inputs are
validated by the caller before ``prepare_output`` (``runner.run``), so a failed first run leaves
nothing behind that a corrected rerun would take for a conflicting job.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re

from preprocessing.config import PreprocessConfig
from preprocessing.energon import NV_META
from preprocessing.job_state import STATE_DIR
from vwlmm_data import storage
from vwlmm_data.contract import FORMATS, MANIFEST_NAME, REJECTS_NAME
from vwlmm_data.run_lock import LOCK_NAME, RunLock

MARKER_NAME = "vwlmm-dataset.json"
# Written by every job before the marker existed; accepted as the same proof of ownership.
LEGACY_MARK = "config.json"
_FORMAT_DIRS = FORMATS  # --format both: one folder per format (worker.shard_relpath)
_SHARD = re.compile(r"shard-\d{6}\.(tar|arrow)(\.idx)?$")


def marker_uri(output: str) -> str:
    return storage.join(output, STATE_DIR, MARKER_NAME)


def is_job_output(output: str, s3: storage.S3Options) -> bool:
    """Whether ``output`` carries a preprocessing job's mark."""
    return storage.exists(marker_uri(output), s3) or \
        storage.exists(storage.join(output, STATE_DIR, LEGACY_MARK), s3)


def _is_empty(output: str, s3: storage.S3Options) -> bool:
    """No file below ``output`` but ``StagedFile`` temps (a job killed while writing its mark)
    and the job lock (``lock_output``)."""
    if not storage.is_s3(output) and not os.path.exists(output):
        return True
    return all(storage.is_staging_name(name) or name == LOCK_NAME
               for name in (uri.rsplit("/", 1)[-1] for uri in storage.list_prefix(output, s3)))


def lock_output(cfg: PreprocessConfig):
    """One job at a time on a local ``--output`` (``vwlmm_data.run_lock``): a second one is
    refused naming the first's host and PID. Take it after ``check_output_allowed`` (the lock
    file is a write) and before ``prepare_output``. S3 has no locks: one job per S3 output is
    the user's to ensure."""
    if storage.is_s3(cfg.output):
        return contextlib.nullcontext()
    return RunLock(cfg.output, "vwlmm-preprocess")


def _relative(output: str, uri: str) -> str:
    if storage.is_s3(output):
        return uri[len(output.rstrip("/")) + 1:]
    return os.path.relpath(uri, output).replace(os.sep, "/")


def is_layout_path(rel: str) -> bool:
    """Whether ``rel`` (relative to the output, '/'-separated) is a file a job writes."""
    parts = rel.split("/")
    if parts[0] == STATE_DIR:
        return True
    if parts[0] in _FORMAT_DIRS:
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] == NV_META:
        return True
    if len(parts) != 1:
        return False
    name = parts[0]
    return name in (MANIFEST_NAME, REJECTS_NAME) or _SHARD.match(name) is not None or \
        storage.is_staging_name(name)


def job_layout_files(output: str, s3: storage.S3Options) -> list[str]:
    """The files below ``output`` that a job's layout names (what ``--overwrite`` deletes)."""
    return [u for u in storage.list_prefix(output, s3) if is_layout_path(_relative(output, u))]


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (local paths resolved, S3 URIs compared by key)."""
    if storage.is_s3(path) != storage.is_s3(folder):
        return False
    if storage.is_s3(path):
        p, f = path.rstrip("/"), folder.rstrip("/")
        return p == f or p.startswith(f + "/")
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _fixed_part(pattern: str) -> str:
    """The part of a glob before its first wildcard, cut at a path separator."""
    m = re.search(r"[*?\[]", pattern)
    if m is None:
        return pattern
    head = pattern[:m.start()]
    return head.rsplit("/", 1)[0] if "/" in head else head


def check_delete_allowed(cfg: PreprocessConfig) -> None:
    """ValueError unless ``cfg.output`` may be cleared by ``--overwrite`` (reads nothing)."""
    why = storage.protected_reason(cfg.output)
    if why is not None:
        raise ValueError(f"--overwrite refuses to clear --output {cfg.output}: {why}")
    guarded = [("--input", _fixed_part(p)) for p in cfg.inputs]
    guarded += [("--image-root", cfg.image_root)] if cfg.image_root else []
    guarded += [("--tokenizer", cfg.tokenizer)]
    for flag, path in guarded:
        if path and _inside(path, cfg.output):
            raise ValueError(f"--overwrite refuses to clear --output {cfg.output}: {flag} "
                             f"{path} is inside it")


def check_output_allowed(cfg: PreprocessConfig) -> bool:
    """Refuse an ``cfg.output`` the job may not use, writing nothing; True when it is a job's.

    A folder that is neither empty nor marked as a job's output is refused, with or without
    ``--overwrite``: its files are somebody else's, and the job's own names (``manifest.json``,
    ``shard-000000.tar``) could overwrite them.
    """
    if cfg.image_root and not storage.is_s3(cfg.image_root) and not os.path.isdir(cfg.image_root):
        raise FileNotFoundError(f"--image-root {cfg.image_root} is not a folder")
    if cfg.overwrite:
        check_delete_allowed(cfg)
    ours = is_job_output(cfg.output, cfg.s3)
    if not ours and not _is_empty(cfg.output, cfg.s3):
        raise ValueError(
            f"--output {cfg.output} is not empty and holds no preprocessing job "
            f"({STATE_DIR}/{MARKER_NAME} is missing): refusing to write (or, with --overwrite, "
            "delete) there; choose a new or empty folder")
    return ours


def prepare_output(cfg: PreprocessConfig) -> None:
    """Check (``check_output_allowed``, again: under ``lock_output`` nobody else changes the
    folder now), clear (``--overwrite``) and claim ``cfg.output`` before the job writes to it."""
    ours = check_output_allowed(cfg)
    if cfg.overwrite and ours:
        storage.remove_files(job_layout_files(cfg.output, cfg.s3), cfg.s3)
        _remove_empty_layout_dirs(cfg.output)
    if not storage.exists(marker_uri(cfg.output), cfg.s3):
        storage.write_bytes(marker_uri(cfg.output), json.dumps(
            {"written_by": "vwlmm-preprocess",
             "note": "this folder is a vwlmm-preprocess output; --overwrite deletes only the "
                     "files of its layout"}, sort_keys=True).encode(), cfg.s3)


def _remove_empty_layout_dirs(output: str) -> None:
    """Local folders of the layout left empty by a clear (S3 has no folders)."""
    if storage.is_s3(output):
        return
    for sub in (STATE_DIR, NV_META, *[posixpath.join(d, NV_META) for d in _FORMAT_DIRS],
                *_FORMAT_DIRS):
        top = os.path.join(output, sub)
        for root, _, _ in os.walk(top, topdown=False):  # deepest first
            try:
                os.rmdir(root)
            except OSError:  # not empty: a user's file is in it
                pass


def remove_stale_temps(cfg: PreprocessConfig) -> None:
    """``StagedFile`` temp files left by a killed writer, in a marked local output only.

    S3 targets stage in the worker's temp folder, so an S3 output has none.
    """
    if storage.is_s3(cfg.output) or not os.path.isdir(cfg.output) or \
            not is_job_output(cfg.output, cfg.s3):
        return
    for path in job_layout_files(cfg.output, cfg.s3):
        if storage.is_staging_name(os.path.basename(path)):
            os.unlink(path)
