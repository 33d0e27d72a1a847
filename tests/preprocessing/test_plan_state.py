"""Resume integrity: the job state records the expanded inputs (size and version per file) and
refuses a rerun whose inputs differ, naming the difference."""

from __future__ import annotations

import pyarrow as pa
import pytest

from preprocessing.job_state import InputsChanged, JobState, check_inputs, input_changes
from preprocessing.plan import Batch, InputFile, make_batches
from preprocessing.sections import read_section, write_sections
from vwlmm_data.storage import FileInfo


def _files(*spec) -> list[FileInfo]:
    return [FileInfo(uri, size, str(version)) for uri, size, version in spec]


def test_first_run_records_and_same_inputs_pass(tmp_path):
    state = JobState(str(tmp_path))
    inputs = _files(("in/b.json", 10, 1), ("in/c.json", 20, 2))
    check_inputs(state, inputs, complete=False)
    recorded = state.read_json(state.inputs_uri)["files"]
    assert recorded[1] == {"uri": "in/c.json", "size": 20, "version": "2"}
    check_inputs(state, inputs, complete=False)
    check_inputs(state, inputs, complete=True)


@pytest.mark.parametrize("complete", [False, True])
def test_changed_inputs_are_named(tmp_path, complete):
    state = JobState(str(tmp_path))
    check_inputs(state, _files(("in/b.json", 10, 1), ("in/c.json", 20, 2)), complete=False)
    now = _files(("in/a.json", 5, 9), ("in/b.json", 10, 1), ("in/c.json", 21, 3))
    with pytest.raises(InputsChanged) as exc:
        check_inputs(state, now, complete=complete)
    msg = str(exc.value)
    assert "1 added: in/a.json" in msg and "1 changed: in/c.json (size 20 -> 21, version 2 -> 3)" in msg
    assert ("is complete" in msg) == complete and ("unfinished" in msg) != complete
    with pytest.raises(InputsChanged, match="1 removed: in/c.json"):
        check_inputs(state, _files(("in/b.json", 10, 1)), complete=complete)


def test_input_changes_lists_few_and_counts_all():
    old = _files(*[(f"f{i:03d}", 1, 1) for i in range(3)])
    new = old + _files(*[(f"g{i:03d}", 1, 1) for i in range(12)])
    (change,) = input_changes(old, new)
    assert change.startswith("12 added: g000, g001, g002, g003, g004 and 7 more")
    assert input_changes(old, list(reversed(old))) == ["the same files in another order"]


def test_batches_group_whole_files():
    files = [InputFile(i, f"f{i}") for i in range(5)]
    batches = make_batches(files, num_units=[2, 0, 1, 3, 1], num_records=[15, 0, 8, 30, 2],
                           batch_records=20)
    assert [([f.index for f in b.files], b.first_unit) for b in batches] == \
        [([0, 1, 2], 0), ([3], 3), ([4], 6)]
    assert make_batches([], [], []) == [Batch(0, (), 0)]


def test_sections_round_trip_and_refuse_strangers(tmp_path):
    schema = pa.schema([("pos", pa.int64()), ("key", pa.string())])
    uri = str(tmp_path / "s")
    write_sections(uri, schema, [pa.table({"pos": [1, 2], "key": ["a", None]}, schema=schema), None,
                                 pa.table({"pos": [7], "key": ["z"]}, schema=schema)])
    assert read_section(uri, 0, schema).to_pylist() == [{"pos": 1, "key": "a"}, {"pos": 2, "key": None}]
    assert read_section(uri, 1, schema).num_rows == 0
    assert read_section(uri, 2, schema)["key"].to_pylist() == ["z"]
    with pytest.raises(IndexError):
        read_section(uri, 3, schema)
    (tmp_path / "t").write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not a sectioned file"):
        read_section(str(tmp_path / "t"), 0, schema)
