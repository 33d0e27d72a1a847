"""A checkpoint's load-time fingerprint: what was saved is what was loaded, or the load stops.

Every save (trainer checkpoints, ``vwlmm-convert import``) writes ``fingerprint.json`` beside
megatron's files: for each tensor, by its global checkpoint key, the float64 sum, sum of
absolute values and sum of squares over the whole tensor, computed from the live model (and the
optimizer's main parameters and Adam moments) *before* megatron serialises them. Every load
(resume, ``model.init_from``, export) recomputes the same numbers from what it loaded, in its own
layout, and refuses with the names of the tensors that differ. A loader or resharding bug
(a tensor read from the wrong offset, zero-filled, or left at its initial value) then fails the
run loudly instead of training on it.

The numbers are independent of the layout: each element is counted once, by the rank holding
the main replica of its shard (replica id 0; for the distributed optimizer, each data-parallel
rank's disjoint range of the main parameter). Only the order of float64 summation depends on
the layout, hence the relative tolerance ``RTOL``, far above float64 rounding over the sizes
here and far below any real damage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vwlmm.checkpoint.layout import FINGERPRINT_FILE, write_file_atomic
from megatron_vwlmm.checkpoint.safe_read import CheckpointError

_FORMAT = "vwlmm-fingerprint/1"
RTOL = 1e-7
MODEL = "model"
OPTIMIZER = "optimizer"

Stats = Tuple[float, float, float, int]  # sum, sum of |x|, sum of x^2, element count


class FingerprintMismatch(CheckpointError):
    """What was loaded is not what was saved (names the tensors); the fingerprint is reduced
    over all ranks, so every rank says the same."""


_CHUNK = 1 << 24  # elements: bounds the float64 temporaries (a save runs at the memory peak)


def _stats(tensor: torch.Tensor) -> Stats:
    t = tensor.detach().reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=t.device)
    for chunk in t.split(_CHUNK):
        x = chunk.to(torch.float64)
        sums += torch.stack((x.sum(), x.abs().sum(), x.square().sum()))
    total, absolute, squares = sums.tolist()  # one device-to-host copy per tensor
    return total, absolute, squares, t.numel()


def _replica_parts(replica_id) -> Tuple[int, ...]:
    return tuple(replica_id) if isinstance(replica_id, (tuple, list)) else (int(replica_id),)


@dataclass
class _Entry:
    """One saved tensor shard: its layout-free name, the parameter, its replica id and the
    tensors that hold its elements (a factory's pieces, e.g. SwiGLU's two halves)."""

    name: str
    param: torch.Tensor
    replica_id: Any
    pieces: List[torch.Tensor]


def _global_name(sharded) -> str:
    """The key plus the offsets of prepended axes (the layer index of stacked layers), which
    do not depend on the layout; TP offsets are left out so shards of one tensor add up."""
    prepended = sharded.global_offset[:sharded.prepend_axis_num]
    return sharded.key + "".join(f"[{o}]" for o in prepended)


def _model_entries(sharded_dicts) -> List[_Entry]:
    """Every tensor shard of the model chunks' sharded state dicts (extra states left out)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    entries = []
    for sharded in sharded_dicts:
        for entry in nested_values(sharded):
            if "_extra_state" in getattr(entry, "key", "_extra_state"):
                continue
            if isinstance(entry, ShardedTensor):
                entries.append(_Entry(_global_name(entry), entry.data, entry.replica_id,
                                      [entry.data]))
            elif isinstance(entry, ShardedTensorFactory):
                built = [b for b in nested_values(entry.build()) if isinstance(b, ShardedTensor)]
                entries.append(_Entry(_global_name(built[0]), entry.data, entry.replica_id,
                                      [b.data for b in built]))
    return entries


def _piece_stats(pieces: List[torch.Tensor]) -> Stats:
    total = [0.0, 0.0, 0.0, 0]
    for piece in pieces:
        for i, v in enumerate(_stats(piece)):
            total[i] += v
    return tuple(total)


def _add(into: Dict[str, List[float]], name: str, stats: Stats) -> None:
    acc = into.setdefault(name, [0.0, 0.0, 0.0, 0])
    for i, v in enumerate(stats):
        acc[i] += v


def local_fingerprint(sharded_dicts, optimizer=None) -> Dict[str, Dict[str, List[float]]]:
    """This rank's share of the fingerprint (sum with the other ranks' with ``reduce``), from
    the ``sharded_state_dict()`` of each of this rank's model chunks (the ones a save writes)."""
    entries = _model_entries(sharded_dicts)
    model: Dict[str, List[float]] = {}
    for entry in entries:
        if all(r == 0 for r in _replica_parts(entry.replica_id)):
            _add(model, entry.name, _piece_stats(entry.pieces))
    out = {MODEL: model}
    if optimizer is not None:
        from megatron_vwlmm.parallel.megatron_compat import main_param_states

        by_param = {id(entry.param): entry for entry in entries}
        states: Dict[str, List[float]] = {}
        for model_param, tensors, dp_sharded in main_param_states(optimizer):
            entry = by_param.get(id(model_param))
            if entry is None:
                continue
            parts = _replica_parts(entry.replica_id)
            # DP ranks each own a disjoint range under the distributed optimizer: all count.
            counted = parts[:-1] if dp_sharded else parts
            if any(r != 0 for r in counted):
                continue
            for state, tensor in tensors.items():
                _add(states, f"{state}/{entry.name}", _stats(tensor))
        out[OPTIMIZER] = states
    return out


def reduce(local: Mapping[str, Mapping[str, List[float]]]) -> Dict[str, Dict[str, List[float]]]:
    """Every rank's shares summed per tensor (a collective over the default group)."""
    gathered = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(local))
    total: Dict[str, Dict[str, List[float]]] = {}
    for share in gathered:
        for section, tensors in share.items():
            into = total.setdefault(section, {})
            for name, stats in tensors.items():
                _add(into, name, stats)
    return total


def fingerprint(sharded_dicts, optimizer=None) -> Dict[str, Dict[str, List[float]]]:
    """The whole fingerprint, on every rank (collective)."""
    return reduce(local_fingerprint(sharded_dicts, optimizer))


@dataclass
class Difference:
    name: str
    why: str


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RTOL * scale + 1e-30


def compare(saved: Mapping[str, Mapping[str, List[float]]],
            loaded: Mapping[str, Mapping[str, List[float]]],
            sections: Iterable[str]) -> List[Difference]:
    """The tensors of ``sections`` whose loaded numbers differ from the saved ones, and saved
    tensors the load did not produce."""
    out: List[Difference] = []
    for section in sections:
        want, got = saved.get(section, {}), loaded.get(section, {})
        for name, (s, a, q, n) in sorted(want.items()):
            if name not in got:
                out.append(Difference(f"{section}:{name}", "not loaded"))
                continue
            s2, a2, q2, n2 = got[name]
            if n != n2:
                out.append(Difference(f"{section}:{name}", f"{n2} elements, saved {n}"))
            elif not (_close(a, a2, max(a, a2)) and _close(q, q2, max(q, q2))
                      and _close(s, s2, max(a, a2))):
                out.append(Difference(
                    f"{section}:{name}",
                    f"sum |x| {a2:.6g} / sum x^2 {q2:.6g}, saved {a:.6g} / {q:.6g}"))
    return out


def write(folder: Path, prints: Mapping[str, Mapping[str, List[float]]]) -> None:
    data = {"format": _FORMAT, **prints}
    write_file_atomic(Path(folder) / FINGERPRINT_FILE, json.dumps(data).encode())


def read(folder: Path) -> Optional[Dict[str, Dict[str, List[float]]]]:
    """The saved fingerprint; None for a checkpoint written without one."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != _FORMAT:
        raise FingerprintMismatch(f"{path}: unknown fingerprint format {data.get('format')!r}")
    return {k: v for k, v in data.items() if k != "format"}


def verify(folder: Path, loaded: Mapping[str, Mapping[str, List[float]]],
           sections: Iterable[str]) -> None:
    """Raise ``FingerprintMismatch`` naming every tensor of ``sections`` that differs from the
    fingerprint saved in ``folder`` (checkpoints saved without one pass unchecked)."""
    saved = read(folder)
    if saved is None:
        return
    diffs = compare(saved, loaded, sections)
    if diffs:
        shown = "; ".join(f"{d.name} ({d.why})" for d in diffs[:8])
        more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        raise FingerprintMismatch(
            f"{folder}: {len(diffs)} tensor(s) loaded differ from what was saved: {shown}{more}. "
            "The checkpoint is damaged or was read wrongly; nothing was trained on it")
