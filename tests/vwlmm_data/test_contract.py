"""The data contract: one definition of every constant, and a manifest that round-trips."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from pipeline.data.synthetic import make_samples, write_dataset
from vwlmm_data import contract
from vwlmm_data.contract import Manifest, VisionInfo, load_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
HOME = REPO / "vwlmm_data" / "contract.py"
ENCODERS = REPO / "vwlmm_data" / "encoders.py"
# Names of the contract's constants, and names they were known under elsewhere.
CONTRACT_NAMES = {"IMAGE_TOKEN_ID", "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "FORMAT_VERSION",
                  "MANIFEST_NAME", "REJECTS_NAME", "ARROW_SCHEMA", "CLIP_MEAN", "CLIP_STD"}
CONTRACT_VALUES = {contract.IMAGE_TOKEN_ID, contract.IGNORE_INDEX, contract.MANIFEST_NAME,
                   contract.REJECTS_NAME}
# Every float of the encoder table's mean/std tuples (0.5 is too common a number to police).
TABLE_FLOATS = {c for kind in ("clip", "siglip") for c in
                (*VisionInfo.of(kind).image_mean, *VisionInfo.of(kind).image_std)} - {0.5}


def _product_files():
    """The repository's Python files, tests excluded (they hold independent references)."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__"))
                         and d not in ("tests", "build", "demo_out") and "egg-info" not in d)
        yield from (Path(folder, f) for f in sorted(files) if f.endswith(".py"))


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _assigned_names(targets) -> list[str]:
    """Names bound by assignment targets (``x = ``, ``x, y = ``); not ``a[i] = `` or ``a.b = ``."""
    names = []
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        names += [e.id for e in elts if isinstance(e, ast.Name)]
    return names


def _redefinitions(path: Path, root: Path = REPO) -> list[str]:
    """Where ``path`` binds a contract constant (by name or by value) or spells a mean/std."""
    where = path.relative_to(root)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None \
                and path != HOME:
            names = _assigned_names(node.targets if isinstance(node, ast.Assign)
                                    else [node.target])
            value = _literal(node.value)
            values = value if isinstance(value, tuple) else (value,)
            by_value = any(isinstance(v, (int, str)) and not isinstance(v, bool)
                           and v in CONTRACT_VALUES for v in values)
            if names and (set(names) & CONTRACT_NAMES or by_value):
                found.append(f"{where}:{node.lineno} assigns {names}")
        if isinstance(node, ast.Constant) and isinstance(node.value, float) \
                and node.value in TABLE_FLOATS and path != ENCODERS:
            found.append(f"{where}:{node.lineno} spells the normalisation constant {node.value}")
    return found


def test_every_contract_constant_is_defined_once():
    """IMAGE_TOKEN_ID & co. live in vwlmm_data/contract.py, mean/std in the encoder table."""
    files = list(_product_files())
    assert HOME in files and ENCODERS in files and len(files) > 50
    assert [hit for path in files for hit in _redefinitions(path)] == []


def test_the_check_catches_redefinitions(tmp_path):
    bad = tmp_path / "mod.py"
    for source in ("IMAGE_TOKEN_ID = -200", "IMAGE_TOKEN, IGNORE = -200, -100",
                   "NAME: str = 'manifest.json'", "MEAN = [0.48145466, 0.4578275, 0.40821073]",
                   "class C:\n    IGNORE_INDEX = -100", "def f(std=(0.26862954, 0.2, 0.2)): pass"):
        bad.write_text(source + "\n")
        assert _redefinitions(bad, tmp_path), source
    bad.write_text("from vwlmm_data.contract import IGNORE_INDEX\nlabels[mask] = -100\n"
                   "ok = labels == IGNORE_INDEX\n")
    assert _redefinitions(bad, tmp_path) == []


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    write_dataset(str(root), make_samples(5), shard_size=2, vision_encoder="siglip")
    return root


def test_manifest_round_trips_through_the_same_dataclasses(written, tmp_path):
    manifest = load_manifest(str(written))
    assert manifest.vision == VisionInfo.of("siglip") and len(manifest.shards) == 6
    assert Manifest.from_json(manifest.to_json()) == manifest
    write_manifest(str(tmp_path), manifest)
    assert load_manifest(str(tmp_path / "manifest.json")) == manifest
    assert (tmp_path / "manifest.json").read_bytes() == (written / "manifest.json").read_bytes()


def test_unknown_fields_are_kept_and_written_back(written):
    data = json.loads((written / "manifest.json").read_text())
    data["lineage"] = {"parent": "s3://b/raw"}  # fields a later version might add
    data["statistics"]["p99_tokens"] = 40
    data["shards"][0]["sha256"] = "ab" * 32
    data["vision"]["interpolation"] = "bicubic"
    manifest = Manifest.from_dict(data)
    assert manifest.extra == {"lineage": {"parent": "s3://b/raw"}}
    assert manifest.shards[0].extra == {"sha256": "ab" * 32}
    assert manifest.to_dict() == data
    assert json.loads(manifest.to_json()) == data


def test_a_manifest_without_vision_reads_as_clip(written):
    data = json.loads((written / "manifest.json").read_text())
    del data["vision"]
    manifest = Manifest.from_dict(data)
    assert manifest.vision == VisionInfo.of("clip")
    assert manifest.vision.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_bad_manifests_name_the_problem(written, tmp_path):
    data = json.loads((written / "manifest.json").read_text())
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        Manifest.from_dict({**data, "format_version": 2})
    with pytest.raises(ValueError, match=r"the manifest is missing field\(s\) \['tokenizer'\]"):
        Manifest.from_dict({k: v for k, v in data.items() if k != "tokenizer"})
    bad_shard = dict(data, shards=[{**data["shards"][0], "format": "tfrecord"}])
    with pytest.raises(ValueError, match="unknown format 'tfrecord'"):
        Manifest.from_dict(bad_shard)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is preprocessing finished"):
        load_manifest(str(tmp_path / "nowhere"))
