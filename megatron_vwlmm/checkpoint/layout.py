"""The checkpoint folder on disk: names, the crash-safe commit of a save, pruning, finding one.

A checkpoint root (the trainer's ``<run_dir>/checkpoints``)::

    latest                    the name of the newest committed checkpoint (written atomically)
    iter_0000120/             a committed checkpoint: megatron's torch_dist files, plus
      vwlmm_checkpoint.json     the marker (run id, iteration): vwlmm deletes only folders
                                that carry it
      vision_tail.safetensors   vision layers the encoder does not run (``metadata.py``)
      fingerprint.json          per-tensor sums every load verifies (``fingerprint.py``)
    iter_0000140.tmp/         a save being written (or killed midway): never read
    iter_0000100.old/         a committed folder being replaced or pruned

Guarantee: a process killed at any instant (SIGKILL, node loss) leaves ``latest`` naming a
complete checkpoint, or absent when no save had written it yet (after ``recover``, which the
trainer runs first, it names the checkpoint a first save committed before dying). It rests on
``os.rename`` being atomic within a folder, and on fsync before each rename that publishes
data:

1. ``stage``: the save goes to ``iter_N.tmp/`` whose marker is written first, so a killed
   save's leftovers are recognisably ours and removed by ``recover`` (run by every ``stage``).
2. ``commit``: fsync every file and the folder; move an existing ``iter_N`` aside to
   ``iter_N.old``; rename ``iter_N.tmp`` to ``iter_N``; rewrite ``latest`` (temp file, fsync,
   rename, fsync of the root); only then delete the displaced folder. Between the two renames
   ``latest`` may name ``iter_N`` while only ``iter_N.old`` exists: readers take the ``.old``
   folder then (``latest_checkpoint``) and the next ``stage`` moves it back.
3. ``prune`` deletes, after ``latest`` has moved, only checkpoints of the same run (run id in
   the marker) below the new iteration, keeping ``keep_last`` in all. So the folder ``latest``
   names and the one just written are never deleted, and neither are another run's
   checkpoints (e.g. those a ``checkpoint.auto_resume=false`` run starts beside). A folder is
   renamed to ``.old`` before its files go, marker last, so a half-deleted folder is never
   mistaken for a checkpoint and is still recognisably ours.

Steps call ``on_step(name)`` (default: nothing) at each point where a crash leaves a distinct
state; ``tests/pipeline/test_checkpoint_crash.py`` kills the process there. Only the standard
library and ``vwlmm_data.storage`` (its ``fsync_dir``; no torch), so those tests drive these
functions in processes that start in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

from vwlmm_data.storage import fsync_dir

LATEST = "latest"
MARKER_FILE = "vwlmm_checkpoint.json"
VISION_TAIL_FILE = "vision_tail.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
STAGING_SUFFIX = ".tmp"
DISPLACED_SUFFIX = ".old"
_NAME = re.compile(r"iter_(\d{7})")
_MARKER_FORMAT = "vwlmm-checkpoint/1"

StepHook = Callable[[str], None]


def _no_hook(step: str) -> None:
    pass


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def staging_folder(root: Path, iteration: int) -> Path:
    """Where the save of ``iteration`` is written before ``commit`` publishes it."""
    return Path(root) / (checkpoint_name(iteration) + STAGING_SUFFIX)


def iteration_of(name: str) -> Optional[int]:
    """The iteration of a committed checkpoint's folder name, None for any other name."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def folder_iteration(folder: Path) -> Optional[int]:
    """The iteration of a checkpoint folder, also of the ``iter_N.old`` name a recovery leaves
    (``latest_checkpoint``); None for other folders."""
    return iteration_of(Path(folder).name.split(".")[0])


# -- durable writes --------------------------------------------------------------------------

def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder itself (files written by any rank or
    library, e.g. megatron's ``common.pt`` and ``metadata.json``, which it does not sync)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.tmp"


def _is_temp_of(entry: str, name: str) -> bool:
    """Whether ``entry`` is a ``write_file_atomic`` temp file of a file called ``name``."""
    return entry.startswith(f".{name}.") and entry.endswith(".tmp")


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a
    part, also after a crash (temp file in the same folder, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = path.with_name(_temp_name(path.name))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# -- the marker ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marker:
    """What vwlmm writes into each checkpoint folder it creates: proof of authorship (the only
    folders it ever deletes carry one) and the run the checkpoint belongs to (pruning stays
    within one run; a resumed run keeps its id)."""

    run_id: str
    iteration: int

    def write(self, folder: Path) -> None:
        data = {"format": _MARKER_FORMAT, **asdict(self)}
        write_file_atomic(Path(folder) / MARKER_FILE, json.dumps(data, indent=2).encode())

    @staticmethod
    def read(folder: Path) -> Optional["Marker"]:
        """The folder's marker; None when it has none (not written by vwlmm) or an unreadable
        one."""
        try:
            data = json.loads((Path(folder) / MARKER_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
            return None
        try:
            return Marker(run_id=str(data["run_id"]), iteration=int(data["iteration"]))
        except (KeyError, TypeError, ValueError):
            return None


# -- reading ---------------------------------------------------------------------------------

def list_checkpoints(root: Path) -> List[Path]:
    """Committed checkpoints (``iter_NNNNNNN`` folders), oldest iteration first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p.name) is not None]
    return sorted(found, key=lambda p: iteration_of(p.name))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None when there is no ``latest``.

    A commit killed between its two renames leaves the named folder under its ``.old`` name;
    that folder is complete and is returned. A marker naming nothing is an error: the folder
    was changed by hand.
    """
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if iteration_of(name) is None:
        raise FileNotFoundError(f"{marker} holds {name!r}, not a checkpoint name (iter_NNNNNNN)")
    for path in (root / name, root / (name + DISPLACED_SUFFIX)):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{marker} names {name!r}, which does not exist; the checkpoint "
                            "folder was modified by hand")


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder ``path`` designates: a checkpoint root (``latest`` is followed), a
    run folder (its ``checkpoints/latest``), or a checkpoint folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return latest_checkpoint(root)
    return path


def previous_checkpoint_hint(path: Path) -> str:
    """The setting that resumes from the checkpoint before ``path`` (or what to do without one)."""
    path = Path(path)
    it = folder_iteration(path)
    older = [] if it is None else [p for p in list_checkpoints(path.parent)
                                   if iteration_of(p.name) < it]
    if older:
        return (f"to resume from the previous checkpoint instead, add --set "
                f"checkpoint.resume_iteration={iteration_of(older[-1].name)}")
    return "no older checkpoint exists: set checkpoint.auto_resume=false to start anew"


# -- writing ---------------------------------------------------------------------------------

def _remove_ours(folder: Path) -> None:
    """Delete a folder that carries our marker: its other entries first, the marker last, so
    a crash midway leaves a folder that is still recognisably ours."""
    for entry in folder.iterdir():
        if entry.name == MARKER_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / MARKER_FILE).unlink(missing_ok=True)
    folder.rmdir()


def recover(root: Path) -> List[str]:
    """Finish what killed saves left; returns a note per folder left alone for the user.

    ``iter_N.old`` goes back to ``iter_N`` when ``latest`` names ``iter_N`` and it is missing
    (a commit died between its renames: the ``.old`` folder is complete); any other ``.old``
    (a displaced or pruned folder, maybe half deleted) and any ``iter_N.tmp`` (a killed save)
    are deleted if ours, or if empty. Folders without our marker are never deleted. Without
    ``latest``, a root whose only checkpoint is ours gets a ``latest`` naming it (the first
    save died before writing ``latest``).
    """
    root = Path(root)
    notes: List[str] = []
    if not root.is_dir():
        return notes
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for path in sorted(root.iterdir()):
        if path.is_file() and _is_temp_of(path.name, LATEST):
            path.unlink()  # a ``latest`` rewrite killed before its rename
            continue
        if not path.is_dir():
            continue
        for suffix in (DISPLACED_SUFFIX, STAGING_SUFFIX):
            if path.name.endswith(suffix) and iteration_of(path.name[:-len(suffix)]) is not None:
                break
        else:
            continue
        final = root / path.name[:-len(suffix)]
        if suffix == DISPLACED_SUFFIX and final.name == latest and not final.exists():
            os.rename(path, final)
            fsync_dir(root)
        elif Marker.read(path) is not None:
            _remove_ours(path)
            fsync_dir(root)
        elif all(_is_temp_of(entry.name, MARKER_FILE) for entry in path.iterdir()):
            for entry in path.iterdir():  # ``stage`` killed while writing the marker
                entry.unlink()
            path.rmdir()
        else:
            notes.append(f"{path}: left in place (no {MARKER_FILE}: not written by vwlmm)")
    committed = list_checkpoints(root)
    if latest is None and len(committed) == 1 and Marker.read(committed[0]) is not None:
        # A first save killed between its rename and writing ``latest``.
        write_file_atomic(root / LATEST, (committed[0].name + "\n").encode())
    return notes


def stage(root: Path, marker: Marker, on_step: StepHook = _no_hook) -> Path:
    """A fresh ``iter_N.tmp`` folder holding the marker, for a save of ``marker.iteration``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    tmp = staging_folder(root, marker.iteration)
    if tmp.exists():
        raise FileExistsError(f"{tmp}: exists and was not written by vwlmm (no {MARKER_FILE}); "
                              "move it away")
    tmp.mkdir()
    marker.write(tmp)
    fsync_dir(root)
    on_step("staged")
    return tmp


def commit(root: Path, tmp: Path, on_step: StepHook = _no_hook) -> Path:
    """Publish a complete ``iter_N.tmp`` as ``iter_N`` and point ``latest`` at it."""
    root, tmp = Path(root), Path(tmp)
    final = root / tmp.name[:-len(STAGING_SUFFIX)]
    displaced = root / (final.name + DISPLACED_SUFFIX)
    if final.exists() and Marker.read(final) is None:
        raise FileExistsError(f"{final}: exists and was not written by vwlmm (no {MARKER_FILE}),"
                              f" so it is not replaced; the new checkpoint stays in {tmp}")
    fsync_tree(tmp)
    on_step("synced")
    if final.exists():
        os.rename(final, displaced)
        fsync_dir(root)
        on_step("displaced")
    os.rename(tmp, final)
    fsync_dir(root)
    on_step("renamed")
    write_file_atomic(root / LATEST, (final.name + "\n").encode())
    on_step("latest")
    if displaced.exists():
        _remove_ours(displaced)
        fsync_dir(root)
        on_step("discarded")
    return final


def prune(root: Path, newest: Path, keep_last: int, on_step: StepHook = _no_hook) -> List[Path]:
    """Delete the run's checkpoints below ``newest`` beyond the ``keep_last`` most recent
    (``newest`` counted); returns what was deleted. See the module docstring for why only
    the run's own, lower iterations are candidates."""
    root, newest = Path(root), Path(newest)
    own = Marker.read(newest)
    if own is None:
        raise FileNotFoundError(f"{newest}: no {MARKER_FILE}; prune only after a commit")
    older = []
    for path in list_checkpoints(root):
        marker = Marker.read(path)
        if marker is not None and marker.run_id == own.run_id and \
                iteration_of(path.name) < own.iteration:
            older.append(path)
    doomed = older[:max(len(older) - (keep_last - 1), 0)]
    for path in doomed:
        displaced = root / (path.name + DISPLACED_SUFFIX)
        os.rename(path, displaced)
        fsync_dir(root)
        on_step("pruning")
        _remove_ours(displaced)
        fsync_dir(root)
    on_step("pruned")
    return doomed
