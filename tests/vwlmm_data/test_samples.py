"""The WebDataset members of a sample: what the writer produces, the reader takes back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.wds_source import iter_shard
from vwlmm_data.contract import ShardInfo
from vwlmm_data.samples import BadSampleError, Sample, from_members, to_members


def _sample(num_images: int = 2) -> Sample:
    return Sample(key="k-1", source_id="1", images=[b"jpeg%d" % i for i in range(num_images)],
                  input_ids=np.array([1, -200, 5, 2], np.int32),
                  labels=np.array([-100, -100, 5, 2], np.int32), num_images=num_images,
                  num_tokens=7, template="plain", meta='{"caption": "é"}')


def test_members_round_trip_through_a_tar(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as w:
        w.write(to_members(_sample()))
    members = to_members(_sample())
    assert sorted(members) == ["__key__", "img0.jpg", "img1.jpg", "input_ids.npy", "json",
                               "labels.npy"]
    back = from_members(members, "x.tar")
    assert back.header() == _sample().header() and back.images == _sample().images
    assert np.array_equal(back.input_ids, _sample().input_ids)
    (raw,) = iter_shard(ShardInfo(path=str(path), format="webdataset", num_samples=1,
                                  num_tokens=7))
    assert raw["images"] == _sample().images and raw["num_images"] == 2
    assert np.array_equal(raw["labels"], _sample().labels)
    assert np.load(io.BytesIO(members["input_ids.npy"])).dtype == np.int32


@pytest.mark.parametrize("drop, match", [("labels.npy", "member k-1.labels.npy is missing"),
                                         ("img1.jpg", "num_images=2 but k-1.img1.jpg is missing")])
def test_a_missing_member_names_the_sample(drop, match):
    members = to_members(_sample())
    del members[drop]
    with pytest.raises(BadSampleError, match=match):
        from_members(members, "x.tar")
