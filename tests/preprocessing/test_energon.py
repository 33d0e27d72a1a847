"""WebDataset output is Energon-ready: ``.nv-meta`` as Megatron-Energon documents it
(``dataset.yaml`` crude, ``split.yaml``, ``.info.yaml`` with per-shard counts) and a ``.tar.idx``
beside each shard; checked on the clean LLaVA run against the shards themselves, and loaded with
megatron-energon where it is installed."""

from __future__ import annotations

import dataclasses
import struct
import tarfile

import numpy as np
import pytest
import yaml

from tests.preprocessing.pp_checks import read_webdataset
from vwlmm_data.contract import FORMAT_VERSION, load_manifest


def _meta(root, name):
    return yaml.safe_load((root / ".nv-meta" / name).read_text())


def test_nv_meta_matches_the_shards(clean_run):
    m = load_manifest(str(clean_run))
    shards = m.shards_of("webdataset")
    names = [s.path for s in shards]  # --format webdataset: shards at the output's top level
    # Exactly Energon's three metadata files, and one index per shard.
    assert sorted(p.name for p in (clean_run / ".nv-meta").iterdir()) == [
        ".info.yaml", "dataset.yaml", "split.yaml"]
    assert sorted(p.name for p in clean_run.glob("*.idx")) == [f"{n}.idx" for n in names]
    assert _meta(clean_run, "dataset.yaml") == {
        "__module__": "megatron.energon", "__class__": "CrudeWebdataset",
        "subflavors": {"vwlmm_format": FORMAT_VERSION}}
    assert _meta(clean_run, "split.yaml") == {"split_parts": {"train": names, "val": [], "test": []},
                                              "exclude": []}
    info = _meta(clean_run, ".info.yaml")
    assert set(info) == {"shard_counts"} and list(info["shard_counts"]) == names
    for shard in shards:
        tar_path = clean_run / shard.path
        samples = read_webdataset([str(tar_path)])
        assert info["shard_counts"][shard.path] == shard.num_samples == len(samples)
        raw = (clean_run / (shard.path + ".idx")).read_bytes()
        offsets = struct.unpack(f"<{len(raw) // 8}Q", raw)
        assert len(offsets) == len(samples) + 1
        with tarfile.open(tar_path) as tf:  # each offset is the first member of its sample
            starts = {m.offset: m.name for m in tf.getmembers()}
            end = max(m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers())
        for off, s in zip(offsets, samples):
            assert starts[off].split(".", 1)[0] == s["key"]
        assert offsets[-1] == end


def test_energon_loads_the_output(clean_run):
    # megatron-energon is an optional dependency (Megatron-LM users bring it); without it the
    # on-disk format is still checked, strictly, by test_nv_meta_matches_the_shards.
    energon = pytest.importorskip(
        "megatron.energon", reason="megatron-energon is not installed (optional: pip install "
        "megatron-energon); test_nv_meta_matches_the_shards checks its on-disk format")

    @dataclasses.dataclass
    class Tokens(energon.Sample):
        input_ids: np.ndarray
        num_images: int

    @energon.stateless
    def cook(raw: dict) -> Tokens:
        return Tokens(**energon.basic_sample_keys(raw), input_ids=raw["input_ids.npy"],
                      num_images=raw["json"]["num_images"])

    class Encoder(energon.DefaultTaskEncoder):
        cookers = [energon.Cooker(cook, has_subflavors={"vwlmm_format": FORMAT_VERSION})]

    worker_config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = energon.get_val_dataset(str(clean_run), split_part="train", batch_size=1,
                                 worker_config=worker_config, task_encoder=Encoder())
    got = {}
    for batch in energon.get_loader(ds):
        got[batch.__key__[0]] = np.asarray(batch.input_ids[0])
    m = load_manifest(str(clean_run))
    want = read_webdataset([str(clean_run / s.path) for s in m.shards_of("webdataset")])
    assert len(got) == m.num_samples == len(want)
    for s in want:
        assert np.array_equal(got[s["key"]], s["input_ids"])
