"""LAION parquet metadata of the wrong type, or with a key on several rows, makes counted
rejects with their reason: a filter is never skipped because its column cannot be read, and
no row silently wins over another."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.sources.laion import LaionOptions, read_unit, reject

KEYS = ["000000000", "000000001", "000000002"]


def _tar(path):
    with tarfile.open(path, "w") as tf:
        for key in KEYS:
            for ext, data in (("jpg", b"\xff\xd8 not decoded here"), ("txt", b"a photo")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _outcomes(tmp_path, columns: dict, opts: LaionOptions) -> dict[str, tuple[str, str]]:
    tar, parquet = tmp_path / "00000.tar", tmp_path / "00000.parquet"
    _tar(tar)
    pq.write_table(pa.table(columns), parquet)
    out = {}
    for rec in read_unit(str(tar), str(parquet), 0, tar.stat().st_size):
        why = rec.error or reject(rec, opts) or ("ok", "")
        out[rec.source_id] = why
    return out


def test_an_integer_key_column_is_a_reject_for_every_record(tmp_path):
    got = _outcomes(tmp_path, {"key": [0, 1, 2], "caption": ["a", "b", "c"]}, LaionOptions())
    assert {k: v[0] for k, v in got.items()} == {k: "metadata_bad_type" for k in KEYS}
    assert "'key'" in got[KEYS[0]][1] and "int64" in got[KEYS[0]][1]


def test_a_score_of_the_wrong_type_is_a_reject_when_its_filter_is_on(tmp_path):
    columns = {"key": KEYS, "similarity": [[0.3], [0.1], None],
               "punsafe": ["0.1", "0.9", None]}
    got = _outcomes(tmp_path, columns, LaionOptions(min_similarity=0.28))
    assert [got[k][0] for k in KEYS] == ["metadata_bad_type", "metadata_bad_type", "ok"]
    assert "similarity" in got[KEYS[0]][1] and "list" in got[KEYS[0]][1]
    got = _outcomes(tmp_path, columns, LaionOptions(max_punsafe=0.5))
    assert [got[k][0] for k in KEYS] == ["metadata_bad_type", "metadata_bad_type", "ok"]
    assert "punsafe" in got[KEYS[0]][1] and "str" in got[KEYS[0]][1]


def test_a_key_on_several_parquet_rows_is_a_reject(tmp_path):
    columns = {"key": [KEYS[0], KEYS[1], KEYS[1], KEYS[2]], "punsafe": [0.1, 0.1, 0.9, 0.1]}
    got = _outcomes(tmp_path, columns, LaionOptions(max_punsafe=0.5))
    assert [got[k][0] for k in KEYS] == ["ok", "metadata_duplicate_key", "ok"]
    assert "2 rows" in got[KEYS[1]][1]
