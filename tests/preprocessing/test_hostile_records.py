"""Hostile inputs are counted rejects with reasons, never a blocked worker or a crashed job:
image paths that escape --image-root, FIFOs, devices, over-long or NUL names, oversized files
and tar members, lone UTF-16 surrogates, JSON nested past the parser's limit; a broken parquet
is an error naming the file before anything runs. A fuzz job of a few hundred corrupted records
per source finishes with every record a sample or a reject, reading and writing nothing outside
its inputs and --output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing.config import PreprocessConfig
from preprocessing.sources import get_source, laion
from tests.preprocessing.inline_job import jpeg, llava_config, run_inline
from vwlmm_data import storage


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a read that blocks on a FIFO)."""
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds}s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _read_llava(tmp_path, entries_json: str, images, tokenizer_dir, **kw):
    """Scan + read every unit of one LLaVA JSON text: [(source_id, error or None)]."""
    data = tmp_path / "in.json"
    data.write_text(entries_json)
    cfg = llava_config(data, images, tokenizer_dir, tmp_path / "out", samples_per_shard=1000, **kw)
    src = get_source("llava")
    scratch = str(tmp_path / "scratch" / "000000")
    os.makedirs(os.path.dirname(scratch), exist_ok=True)
    scan = src.scan(str(data), cfg, scratch)
    out = []
    for loc in scan.units:
        unit = {"source": "llava", "file": str(data), "scratch": scratch, **loc}
        out += [(r.source_id, r.error and r.error[0]) for r in src.read_unit(unit, cfg)]
    assert len(out) == len(scan.keys)
    return out


def _sentinel(tmp_path) -> Path:
    """A folder beside the inputs that no job may read: a real image, so a read would show."""
    s = tmp_path / "sentinel"
    s.mkdir()
    (s / "secret.jpg").write_bytes(jpeg((1, 2, 3)))
    return s


def _hostile_image_root(tmp_path, sentinel: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(jpeg((200, 10, 10)))
    (images / "big.jpg").write_bytes(jpeg((10, 200, 10)) + b"\0" * 5000)
    (images / "notadir.jpg").write_bytes(jpeg((10, 10, 200)))
    (images / "dir.jpg").mkdir()
    (images / "sub").mkdir()
    (images / "sub" / "inside.jpg").symlink_to(images / "good.jpg")  # a symlink that stays in
    (images / "out.jpg").symlink_to(sentinel / "secret.jpg")
    os.mkfifo(images / "fifo.jpg")
    return images


HOSTILE_PATHS = {  # image path -> reject reason (None: a sample)
    "good.jpg": None,
    "sub/inside.jpg": None,
    "../sentinel/secret.jpg": "image_path_outside_root",
    "sub/../../sentinel/secret.jpg": "image_path_outside_root",
    "out.jpg": "image_path_outside_root",
    "/dev/zero": "image_path_outside_root",
    "fifo.jpg": "image_not_a_file",
    "dir.jpg": "image_not_a_file",
    "notadir.jpg/x.jpg": "image_unreadable",
    "a\0b.jpg": "image_path_invalid",
    "x" * 300 + ".jpg": "image_path_invalid",
    "big.jpg": "file_too_large",
    "missing.jpg": "image_missing",
}


def _entry(i, image, text="A picture.", **kw) -> dict:
    return {"id": f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}], **kw}


def test_llava_image_paths_and_special_files_are_rejects(tmp_path, tokenizer_dir):
    sentinel = _sentinel(tmp_path)
    images = _hostile_image_root(tmp_path, sentinel)
    paths = list(HOSTILE_PATHS) + [str(sentinel / "secret.jpg")]
    entries = [_entry(i, p) for i, p in enumerate(paths)]
    with deadline(60):
        got = _read_llava(tmp_path, json.dumps(entries), images, tokenizer_dir,
                          max_image_bytes=4000)
    want = [(f"r{i}", HOSTILE_PATHS.get(p, "image_path_outside_root")) for i, p in enumerate(paths)]
    assert got == want


def test_surrogates_deep_nesting_and_line_separators_in_llava_json(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg((5, 5, 5)))
    deep = "[" * 100_000 + "]" * 100_000
    text = ("[" + json.dumps(_entry(0, "a.jpg"))
            + ', {"id": "r1", "conversations": [{"from": "human", "value": "<image>"}, '
              '{"from": "gpt", "value": "emoji \\ud83d cut"}], "image": "a.jpg"}'
            + ', {"id": "\\udc00", "conversations": [{"from": "human", "value": "hi"}, '
              '{"from": "gpt", "value": "yo"}]}'
            + ', {"id": "r3", "x": ' + deep + "}"
            + ", " + json.dumps(_entry(4, "a.jpg", "one\u2028two\u0085three"), ensure_ascii=False)
            + "]")
    got = _read_llava(tmp_path, text, images, tokenizer_dir)
    assert got == [("r0", None), ("r1", "bad_text"), ("\\udc00", "bad_text"),
                   ("in.json#3", "bad_json"), ("r4", None)]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_laion_members_surrogates_oversize_and_broken_parquet(tmp_path, tokenizer_dir):
    img = jpeg((9, 9, 9))
    deep = ("[" * 1500 + "]" * 1500).encode()  # past the parser, under the limit
    tar = _tar(tmp_path / "00000.tar", [
        ("k1.jpg", img), ("k1.json", b'{"caption": "scraped \\ud83d caption"}'),
        ("k2.jpg", img), ("k2.txt", b"fine"),
        ("k3.jpg", img + b"\0" * 5000), ("k3.txt", b"too big"),
        ("k4.jpg", img), ("k4.txt", b"deep json ignored"), ("k4.json", deep),
        ("k5.jpg", img), ("k5.json", b'{"key": "\\ud800"}'), ("k5.txt", b"key with surrogate"),
    ])
    cfg = PreprocessConfig(source="laion", inputs=[str(tar)], tokenizer=tokenizer_dir,
                           output=str(tmp_path / "out"), max_image_bytes=4000, image_size=28)
    src = get_source("laion")
    scan = src.scan(str(tar), cfg, "")
    assert len(scan.keys) == 5 and scan.digests[2] is None  # the oversized sample: no digest
    unit = {"source": "laion", "file": str(tar), "parquet": None, "start": 0,
            "end": os.path.getsize(tar), "num_records": 5}
    got = [(r.source_id, r.error and r.error[0]) for r in src.read_unit(unit, cfg)]
    assert got == [("k1", "bad_text"), ("k2", None), ("k3", "file_too_large"), ("k4", None),
                   ("\\ud800", "bad_text")]
    # A broken parquet stops the job before anything is planned, naming the file.
    parquet = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"key": ["k1"], "caption": ["x"]}), parquet)
    blob = parquet.read_bytes()
    parquet.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"00000\.parquet: not a readable parquet file"):
        src.input_files([str(tar), str(parquet)])
    pq.write_table(pa.table({"id": ["k1"]}), parquet)
    with pytest.raises(ValueError, match=r"00000\.parquet: parquet has no 'key' column"):
        src.input_files([str(tar), str(parquet)])
    # S3 parquets are checked in their tar's scan when the --input patterns name them.
    assert storage.s3_pattern_names("s3://b/laion/*.parquet", "s3://b/laion/00000.parquet")
    assert not storage.s3_pattern_names("s3://b/laion/*.tar", "s3://b/laion/00000.parquet")
    assert not storage.s3_pattern_names("s3://c/laion/*.parquet", "s3://b/laion/00000.parquet")


# ---------------------------------------------------------------------------------- fuzz


class FileAudit:
    """Every path this process opens while ``on`` (``sys.addaudithook``: hooks stay for the
    process's life, so this one is installed once and switched)."""

    paths: list[tuple[str, bool]] = []
    on = False
    installed = False

    @classmethod
    def hook(cls, event, args):
        if cls.on and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = bool(mode and any(c in str(mode) for c in "wax+")) or \
                bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            cls.paths.append((os.fsdecode(args[0]), writes))

    @classmethod
    @contextlib.contextmanager
    def watching(cls):
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True
        cls.paths, cls.on = [], True
        try:
            yield cls.paths
        finally:
            cls.on = False


def _llava_fuzz(rng: random.Random, images: Path, sentinel: Path, n: int) -> list:
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + rng.randbytes(300))
    (images / "truncated.jpg").write_bytes(jpeg((50, 60, 70))[:200])
    hostile = list(HOSTILE_PATHS) + [str(sentinel / "secret.jpg"), "corrupt.jpg",
                                     "truncated.jpg", "sub/../good.jpg"]
    mutations = [
        lambda i: _entry(i, "good.jpg", f"Caption {i}."),
        lambda i: _entry(i, rng.choice(hostile)),
        lambda i: _entry(i, "good.jpg", "lone \ud83d surrogate"),
        lambda i: _entry(i, "good.jpg", "sep\u2028ara\u2029tors\x85"),
        lambda i: _entry(i, "good.jpg", "<image> twice"),
        lambda i: _entry(i, rng.choice([7, [], [3], {"a": 1}, ""])),
        lambda i: {"id": rng.choice([None, [1, 2], {"k": "v"}, 3.5, True, f"r{i}"]),
                   "conversations": rng.choice([None, 5, [], [1], [{"from": "x", "value": 1}]])},
        lambda i: rng.choice([None, 3, "text", [1, 2], True]),
        lambda i: {"id": f"r{i}", "deep": json.loads("[" * 300 + "]" * 300)},
        lambda i: {"id": f"r{i % 7}", "conversations": [{"from": "human", "value": "no image"},
                                                        {"from": "gpt", "value": "ok"}]},
    ]
    return [rng.choice(mutations)(i) for i in range(n)]


def _laion_fuzz(rng: random.Random, path: Path, n: int, limit: int) -> tuple[Path, int]:
    """A tar of ``n`` corrupted samples, some with a member named outside any folder between
    their members (splitting them in two): (the tar, its number of samples)."""
    good = jpeg((120, 130, 140))
    members = []
    for i in range(n):
        k = f"{i:05d}"
        kind = rng.randrange(9)
        image = {0: good, 1: rng.randbytes(200), 2: good[:150],
                 3: good + rng.randbytes(limit)}.get(kind, good)
        if kind != 4:
            members.append((f"{k}.jpg", image))
        if kind == 5:
            members.append((f"{k}.json", rng.choice([b'{"caption": "\\udfff x"}', b"{not json",
                                                     b"[" * 1500 + b"]" * 1500, b'{"key": "00001"}',
                                                     b'{"key": {"a": [1]}}'])))
        if kind == 6:
            members.append((rng.choice([f"/abs/../{k}.jpg", f"\udcff{k}.jpg"]),
                            rng.choice([good, good + rng.randbytes(limit)])))
        members.append((f"{k}.txt", rng.choice([f"a caption {i}".encode(), b"\xff\xfe bad utf-8",
                                                b"", f"{i} ".encode() * 20])))
    keys = [laion._split_name(name)[0] for name, _ in members]
    return _tar(path, members), sum(a != b for a, b in zip(keys, [None] + keys))


def test_fuzz_job_finishes_with_every_record_a_sample_or_a_reject(tmp_path, tokenizer_dir,
                                                                  monkeypatch):
    rng = random.Random(1234)
    sentinel = _sentinel(tmp_path)
    old = 1_000_000_000
    for p in (sentinel, sentinel / "secret.jpg"):
        os.utime(p, (old, old + 10))  # relatime: any read would move atime forward
    before = {p: os.stat(p) for p in (sentinel, sentinel / "secret.jpg")}
    images = _hostile_image_root(tmp_path, sentinel)
    entries = _llava_fuzz(rng, images, sentinel, 300)
    data = tmp_path / "fuzz.json"
    data.write_text(json.dumps(entries))
    tar, num_tar_samples = _laion_fuzz(rng, tmp_path / "laion" / "00000.tar", 250, limit=4000)
    jobs = [llava_config(data, images, tokenizer_dir, tmp_path / "out_llava", max_image_bytes=4000,
                         samples_per_shard=64),
            PreprocessConfig(source="laion", inputs=[str(tar)], tokenizer=tokenizer_dir,
                             output=str(tmp_path / "out_laion"), image_size=28, patch_size=14,
                             max_seq_len=64, samples_per_shard=64, max_image_bytes=4000,
                             progress=False)]
    for cfg, num_records in zip(jobs, (300, num_tar_samples)):
        with deadline(240), FileAudit.watching() as opened:
            manifest = run_inline(monkeypatch, cfg).manifest
        assert manifest.statistics.num_records == num_records
        assert manifest.num_samples + sum(manifest.rejected.values()) == num_records
        assert manifest.num_samples > 20 and len(manifest.rejected) >= 4, manifest.rejected
        rejects = (Path(cfg.output) / "rejects.jsonl").read_text().splitlines()
        assert len(rejects) == sum(manifest.rejected.values())
        assert all(json.loads(r)["reason"] for r in rejects)
        assert opened and not [p for p, _ in opened if str(sentinel) in os.path.realpath(p)]
        allowed = (cfg.output, "/dev/")
        assert not [p for p, w in opened if w and not os.path.realpath(p).startswith(allowed)]
    assert {p: os.stat(p) for p in before} == before  # not read, not written
    assert (images / "fifo.jpg").exists()
