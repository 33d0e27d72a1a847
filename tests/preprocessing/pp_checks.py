"""Helpers of the preprocessing tests: run the CLI, hash outputs, and an independent reader that
checks every sample against the contract (tests/preprocessing/*.py import it)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from preprocessing.fixtures import FIXTURE_FILTERS
from preprocessing.sources import option_owners
from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID, load_manifest

# Small images keep the suite fast: 56 px / 14 px patches = 16 patch tokens per image.
IMAGE_SIZE, NUM_PATCHES = 56, 16
BASE_ARGS = ["--image-size", str(IMAGE_SIZE), "--samples-per-shard", "8", "--no-progress"]


def filter_args(source: str) -> list[str]:
    """FIXTURE_FILTERS as flags, less the options of other sources (``--source`` refuses them)."""
    others = {k for k, owner in option_owners().items() if owner != source}
    return [a for k, v in FIXTURE_FILTERS.items() if k not in others
            for a in (f"--{k.replace('_', '-')}", str(v))]


def run_cli(ray_head, args: list[str], env: dict | None = None, timeout: float = 240):
    """Run `python -m preprocessing.cli` as a driver joining the shared head."""
    full_env = {**ray_head["env"], **(env or {})}
    cmd = [sys.executable, "-m", "preprocessing.cli", *args, "--ray-address", ray_head["address"]]
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def tree_digest(root: str | Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (the whole output, state folder included)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def llava_args(demo, tokenizer_dir, template: str, output, inputs=None, image_root=None) -> list[str]:
    return ["--source", "llava", "--input", *(inputs or [str(p) for p in demo.llava_json]),
            "--image-root", str(image_root or demo.image_root), "--tokenizer", tokenizer_dir,
            "--template", template, "--output", str(output), "--max-seq-len", "512",
            *BASE_ARGS, *filter_args("llava")]


def laion_args(demo, tokenizer_dir, output, inputs=None, fmt="both") -> list[str]:
    return ["--source", "laion", "--input", *(inputs or demo.laion_inputs), "--tokenizer",
            tokenizer_dir, "--template", "plain", "--output", str(output), "--format", fmt,
            "--max-seq-len", "256", *BASE_ARGS, *filter_args("laion")]


def read_webdataset(paths: list[str]) -> list[dict]:
    """Samples through the webdataset library itself (what a trainer would use)."""
    out = []
    for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        header = json.loads(s["json"])
        n = header["num_images"]
        out.append({"key": s["__key__"], **header,
                    "input_ids": np.load(io.BytesIO(s["input_ids.npy"])),
                    "labels": np.load(io.BytesIO(s["labels.npy"])),
                    "images": [s[f"img{i}.jpg"] for i in range(n)]})
        assert sorted(k for k in s if not k.startswith("__")) == sorted(
            ["json", "input_ids.npy", "labels.npy", *[f"img{i}.jpg" for i in range(n)]])
    return out


def read_arrow(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        with pa.memory_map(p) as src:
            table = pa.ipc.open_file(src).read_all()
        for row in table.to_pylist():
            row["input_ids"] = np.asarray(row["input_ids"], np.int32)
            row["labels"] = np.asarray(row["labels"], np.int32)
            out.append(row)
    return out


def check_sample(s: dict, tok) -> None:
    ids, labels = s["input_ids"], s["labels"]
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
    assert ids[0] == tok.bos_token_id
    img = ids == IMAGE_TOKEN_ID
    assert int(img.sum()) == s["num_images"] == len(s["images"])
    assert (labels[img] == IGNORE_INDEX).all()
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
    assert s["num_tokens"] == len(ids) - s["num_images"] + s["num_images"] * NUM_PATCHES
    for jpg in s["images"]:
        im = Image.open(io.BytesIO(jpg))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
    assert s["key"].replace("-", "").replace("_", "").isalnum()


def render_ids(ids: np.ndarray, tok) -> str:
    """Decode with specials spelled out: ``<s>``, ``</s>``, ``<image>``."""
    out, run = [], []
    for t in list(ids) + [None]:
        if t is None or t in (IMAGE_TOKEN_ID, tok.bos_token_id, tok.eos_token_id):
            if run:
                out.append(tok.decode(run, clean_up_tokenization_spaces=False))
                run = []
            if t is not None:
                out.append({IMAGE_TOKEN_ID: "<image>", tok.bos_token_id: "<s>",
                            tok.eos_token_id: "</s>"}[int(t)])
        else:
            run.append(int(t))
    return "".join(out)


def supervised_runs(s: dict, tok) -> list[str]:
    """Decoded text of each maximal run of supervised tokens (a final EOS spelled ``</s>``)."""
    runs, cur = [], []
    for t, l in zip(s["input_ids"], s["labels"]):
        if l != IGNORE_INDEX:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r[:-1], clean_up_tokenization_spaces=False) + "</s>" if r[-1] == tok.eos_token_id
            else tok.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def check_output(out: str, expected: dict[str, str], tok, formats=("webdataset",)) -> dict[str, dict]:
    """Contract checks on a finished local output; returns samples by source_id."""
    m = load_manifest(out)
    rejects = [json.loads(l) for l in Path(out, "rejects.jsonl").read_text().splitlines()]
    got_reasons = {r["source_id"]: r["reason"] for r in rejects}
    want_reasons = {k: v for k, v in expected.items() if v != "ok"}
    assert got_reasons == want_reasons
    assert m.rejected == dict(collections.Counter(r["reason"] for r in rejects))
    by_format = {}
    for fmt in formats:
        paths = [str(Path(out, s.path)) for s in m.shards_of(fmt)]
        assert paths, fmt
        samples = read_webdataset(paths) if fmt == "webdataset" else read_arrow(paths)
        assert len(samples) == m.num_samples == sum(s.num_samples for s in m.shards_of(fmt))
        assert sum(s["num_tokens"] for s in samples) == m.statistics.num_tokens
        by_format[fmt] = samples
    samples = by_format[formats[0]]
    for other in formats[1:]:  # same samples, same order, same bytes in both formats
        for a, b in zip(samples, by_format[other]):
            assert a["key"] == b["key"] and a["images"] == b["images"] and a["meta"] == b["meta"]
            assert np.array_equal(a["input_ids"], b["input_ids"])
            assert np.array_equal(a["labels"], b["labels"])
    for s in samples:
        check_sample(s, tok)
    by_id = {s["source_id"]: s for s in samples}
    assert len(by_id) == len(samples)
    assert set(by_id) == {k for k, v in expected.items() if v == "ok"}
    assert m.image_token_id == IMAGE_TOKEN_ID and m.ignore_index == IGNORE_INDEX
    assert m.num_patches_per_image == NUM_PATCHES and m.tokenizer.vocab_size == len(tok)
    return by_id
