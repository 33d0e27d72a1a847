"""The partitioned dedup / key-collision step decides exactly what one sequential pass decides,
for any number of partitions and batches (in-process, real files in a temporary state folder)."""

from __future__ import annotations

import random

import pytest

from preprocessing import dedup
from preprocessing.job_state import JobState, file_digests, read_scan, write_scan
from preprocessing.plan import InputFile, build_plan, iter_units, serial_executor, unit_decisions
from preprocessing.sources import laion, llava


def sequential_decisions(files: list[tuple[list[str], list]], sps: int, dedup_on: bool) -> list[dict]:
    """The reference: one pass in global input order, as a single driver decides it (per unit:
    {record index in unit: [kind, key]})."""
    first_key_of: dict[str, str] = {}
    used: set[str] = set()
    out = []
    for keys, digests in files:
        for c in range(0, len(keys), sps):
            dec = {}
            for i in range(c, min(c + sps, len(keys))):
                digest, base = digests[i], keys[i]
                if dedup_on and digest and digest in first_key_of:
                    dec[i - c] = ["duplicate", first_key_of[digest]]
                    continue
                key, n = base, 1
                while key in used:
                    key, n = f"{base}_{n}", n + 1
                if key != base:
                    dec[i - c] = ["rename", key]
                used.add(key)
                if digest:
                    first_key_of.setdefault(digest, key)
            out.append(dec)
    return out


def _write_scans(state: JobState, files: list[tuple[list[str], list]], sps: int) -> list[InputFile]:
    inputs = []
    for f, (keys, digests) in enumerate(files):
        units = [{"num_records": len(keys[c:c + sps]), "first": c} for c in range(0, len(keys), sps)]
        write_scan(state, f, f"in/{f}", keys, digests, units)
        inputs.append(InputFile(f, f"in/{f}"))
    return inputs


def partitioned_decisions(tmp_path, files, sps: int, dedup_on: bool, partitions: int,
                          batch_records: int) -> list[dict]:
    state = JobState(str(tmp_path / f"p{partitions}-b{batch_records}-d{int(dedup_on)}"))
    inputs = _write_scans(state, files, sps)
    n_units = [-(-len(k) // sps) for k, _ in files]
    summary = build_plan(serial_executor, state, inputs, n_units, [len(k) for k, _ in files],
                         partitions=partitions, dedup_on=dedup_on, unit_fields={"source": "t"},
                         batch_records=batch_records)
    units = list(iter_units(state, summary))
    assert [u["index"] for u in units] == list(range(sum(n_units)))
    assert summary["num_records"] == sum(len(k) for k, _ in files)
    return [{int(i): d for i, d in unit_decisions(state, u).items()} for u in units]


_KEYS = ["a", "a_1", "a_1_1", "a_2", "a_10", "a_01", "a_0", "a__1", "b", "b_1", "_1", "c_1_2",
         "c", "c_1", "d-x_3"]


def _random_files(rng: random.Random) -> list[tuple[list[str], list]]:
    files = []
    for f in range(rng.randint(1, 9)):
        n = rng.choice([17, 40]) if f == 0 else rng.choice([0, 1, 3, 8, 17, 40])
        keys = [rng.choice(_KEYS) if rng.random() < 0.7 else f"k{rng.randint(0, 30)}" for _ in range(n)]
        digests = [None if rng.random() < 0.15 else f"{rng.randint(0, 25):032x}" for _ in range(n)]
        files.append((keys, digests))
    return files


@pytest.mark.parametrize("seed", range(4))
def test_random_records_any_partitions_and_batches(tmp_path, seed):
    """Many duplicates and colliding ids (``a``, ``a_1``, ``a_1_1``, ``a_01``, ...); batches of
    one file, of a few files and of the whole input."""
    rng = random.Random(seed)
    files = _random_files(rng)
    sps = rng.choice([1, 4, 7])
    want = sequential_decisions(files, sps, True)
    kinds = {d[0] for u in want for d in u.values()}
    assert kinds == {"duplicate", "rename"}, "the draw does not exercise both decisions"
    for partitions, batch_records in zip((1, 3, 7), rng.sample([1, 25, 10**6], 3)):
        got = partitioned_decisions(tmp_path, files, sps, True, partitions, batch_records)
        assert got == want, (partitions, batch_records)
    want = sequential_decisions(files, sps, False)  # dedup off: identical content keeps both keys
    assert partitioned_decisions(tmp_path, files, sps, False, 3, 25) == want


def test_candidate_keys_share_their_root():
    rng = random.Random(0)
    for _ in range(2000):
        k = "".join(rng.choice("ab_01-9") for _ in range(rng.randint(1, 8)))
        n = rng.randint(1, 120)
        assert dedup.key_root(f"{k}_{n}") == dedup.key_root(k)
    assert dedup.key_root("a_1_2") == "a" and dedup.key_root("a_01") == "a_01"
    assert dedup.key_root("a_01_3") == "a_01" and dedup.key_root("x_0") == "x_0"


def test_many_collisions_of_one_key_stay_linear(tmp_path):
    """10^4 records of one id: the decisions equal the reference's (k, k_1, ..., k_9999)."""
    keys = ["same"] * 10_000
    files = [(keys, [f"{i:032x}" for i in range(10_000)])]
    got = partitioned_decisions(tmp_path, files, 10_000, True, 3, 10**6)
    assert 0 not in got[0] and len(got[0]) == 9999
    assert got[0][1] == ["rename", "same_1"] and got[0][9999] == ["rename", "same_9999"]


def _fixture_scans(demo, tmp_path):
    """The fixtures' records as the sources scan them: LAION tars (digests in the scan) and the
    LLaVA JSON files (split into unit files, digests per unit, as the job computes them)."""
    sps = 8
    out = {"laion": [], "llava": []}
    for t in demo.laion_tars:
        recs = laion.scan(str(t))
        out["laion"].append(([r["key"] for r in recs], [r["digest"] for r in recs]))
    state = JobState(str(tmp_path / "llava-split"))
    for f, path in enumerate(demo.llava_json):
        keys = llava.split(str(path), state.records_prefix(f), sps)
        digests = []
        for c in range(-(-len(keys) // sps)):
            digests += llava.digests(f"{state.records_prefix(f)}-{c:06d}.jsonl", c * sps,
                                     str(demo.image_root), path.name)
        out["llava"].append((keys, digests))
    return out, sps


def test_fixtures_match_the_sequential_pass(demo, tmp_path):
    scans, sps = _fixture_scans(demo, tmp_path)
    for source, files in scans.items():
        want = sequential_decisions(files, sps, True)
        assert any(d and d[0] == "duplicate" for u in want for d in u.values()), source
        for partitions in (1, 3, 7):
            assert partitioned_decisions(tmp_path / source, files, sps, True, partitions, 10) == want


def test_state_readers_use_unit_digests(tmp_path):
    state = JobState(str(tmp_path))
    write_scan(state, 0, "x", ["a", "b", "c"], None, [{"num_records": 2}, {"num_records": 1}])
    state.write_json(state.digests_uri(0, 0), ["d1", None])
    state.write_json(state.digests_uri(0, 1), ["d1"])
    assert file_digests(state, 0, read_scan(state, 0, "x")) == ["d1", None, "d1"]
    assert read_scan(state, 0, "other") is None
