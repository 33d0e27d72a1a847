"""Data loading: order, DP split, exact resume, validation split, decoding, bad input, S3."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.decode import BadSampleError, decode_sample
from pipeline.data.loader import LoaderSpec, RankData
from pipeline.data.order import is_validation_key
from pipeline.data.synthetic import make_samples, write_dataset
from pipeline.validate import load_manifest, select_shards
from vwlmm_data.contract import VisionInfo
from vwlmm_data.storage import S3Options

CLIP = VisionInfo.of("clip")

N = 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root), make_samples(N, seed=1), shard_size=5)  # 6 shards per format
    return root


def first_image(samples, spec):
    """Collation stand-in that keeps the decoded tensors (the model's collate is tested there)."""
    return torch.stack([s["images"][0] for s in samples])


def spec_for(root: Path, fmt: str, dp_size=1, dp_rank=0, workers=0, valid=0.0, mbs=2, gbs=4,
             seed=5) -> LoaderSpec:
    manifest = load_manifest(str(root), S3Options())
    return LoaderSpec(shards=tuple(select_shards(manifest, str(root), fmt)), format=fmt,
                      micro_batch_size=mbs, global_batch_size=gbs, dp_size=dp_size,
                      dp_rank=dp_rank, seed=seed, seq_length=64, num_patches=16, image_size=32,
                      pad_token_id=0, vision=manifest.vision, valid_fraction=valid, num_workers=workers,
                      collate_fn=first_image)


def keys(iterator, n_microbatches):
    return [k for _, ks in itertools.islice(iterator, n_microbatches) for k in ks]


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_dp_ranks_disjoint_and_cover_the_epoch(dataset, fmt):
    dp = 2 if fmt == "arrow" else 3  # 6 shards deal evenly over 3 streaming ranks
    gbs = 6
    steps = N // gbs  # one epoch
    per_rank = [keys(RankData(spec_for(dataset, fmt, dp, r, gbs=gbs, mbs=1)).train_iterator(0),
                     steps * gbs // dp) for r in range(dp)]
    seen = [k for ks in per_rank for k in ks]
    assert len(seen) == len(set(seen)) == N
    assert set(seen) == {f"test-{i:05d}" for i in range(N)}


@pytest.mark.parametrize("fmt, workers", [("arrow", 0), ("arrow", 2), ("webdataset", 0),
                                          ("webdataset", 2)])
def test_resume_from_consumed_samples_continues_the_same_stream(dataset, fmt, workers):
    """Reading from position 12 gives exactly what the uninterrupted reader gave after 12
    samples, across an epoch boundary, with or without loader workers."""
    spec = spec_for(dataset, fmt, workers=workers)
    full = keys(RankData(spec).train_iterator(0), 25)  # 50 samples: crosses into epoch 2
    resumed = keys(RankData(spec).train_iterator(12), 19)
    assert full[12:] == resumed
    assert sorted(full[:N]) == sorted(f"test-{i:05d}" for i in range(N))  # one full epoch
    if fmt == "arrow":  # a seeded global shuffle: not file order, and a new order per epoch
        assert full[:N] != sorted(full[:N]) and full[N:2 * N] != full[:len(full) - N]
        other_seed = keys(RankData(spec_for(dataset, fmt, seed=6)).train_iterator(0), 15)
        assert other_seed != full[:30]


def test_webdataset_shuffles_shards_not_only_reads_them_in_order(dataset):
    spec = spec_for(dataset, "webdataset")
    stream = keys(RankData(spec).train_iterator(0), 30)  # two epochs
    shard_of = [int(k.split("-")[1]) // 5 for k in stream]
    epoch1 = [s for i, s in enumerate(shard_of[:N]) if i % 5 == 0]
    epoch2 = [s for i, s in enumerate(shard_of[N:]) if i % 5 == 0]
    assert sorted(epoch1) == list(range(6)) and epoch1 != epoch2


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_validation_split_is_held_out(dataset, fmt):
    spec = spec_for(dataset, fmt, valid=0.3)
    data = RankData(spec)
    train = set(keys(data.train_iterator(0), 40))
    valid = set(keys(data.valid_iterator(), 4))
    expected_valid = {f"test-{i:05d}" for i in range(N) if is_validation_key(f"test-{i:05d}", 0.3)}
    assert 0 < len(expected_valid) < N
    assert valid <= expected_valid and not train & expected_valid
    assert train | expected_valid == {f"test-{i:05d}" for i in range(N)}


def test_images_are_decoded_and_clip_normalised(dataset):
    batch, ks = next(RankData(spec_for(dataset, "arrow")).train_iterator(0))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    raw = next(s for s in make_samples(N, seed=1) if s["key"] == ks[0])
    pixels = np.asarray(Image.open(io.BytesIO(raw["images"][0])).convert("RGB"), np.float32) / 255
    mean, std = torch.tensor(CLIP.image_mean), torch.tensor(CLIP.image_std)
    ref = (torch.from_numpy(pixels).permute(2, 0, 1) - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(batch[0], ref)


def test_real_collation_builds_model_batches(dataset):
    spec = spec_for(dataset, "arrow")
    spec = LoaderSpec(**{**spec.__dict__, "collate_fn": None})
    batch, ks = next(RankData(spec).train_iterator(0))
    assert batch.tokens.shape == (2, 64) and batch.images.shape == (2, 3, 32, 32)
    assert int(batch.image_token_mask.sum()) == 2 * 16


def test_bad_samples_are_named(dataset):
    sample = make_samples(1)[0]
    broken = dict(sample, images=[b"not a jpeg"])
    with pytest.raises(BadSampleError, match=r"sample 'test-00000' in shard-x.arrow row 3, "
                                             r"image 0: image is not a decodable JPEG"):
        decode_sample(broken, 32, "shard-x.arrow row 3", CLIP)
    missing = dict(sample, images=[])
    with pytest.raises(BadSampleError, match="1 image placeholders, 0 images"):
        decode_sample(missing, 32, "x", CLIP)
    wrong_size = dict(sample)
    buf = io.BytesIO()
    Image.new("RGB", (48, 48)).save(buf, format="JPEG")
    wrong_size["images"] = [buf.getvalue()]
    with pytest.raises(BadSampleError, match="image is 48x48, expected 32x32"):
        decode_sample(wrong_size, 32, "x", CLIP)


def test_manifest_problems_are_reported(tmp_path, dataset):
    with pytest.raises(ConfigError, match="no manifest.json there"):
        load_manifest(str(tmp_path), S3Options())
    bad = json.loads((dataset / "manifest.json").read_text())
    bad["format_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="format_version 2 is not supported"):
        load_manifest(str(tmp_path), S3Options())
    lying = json.loads((dataset / "manifest.json").read_text())
    for s in lying["shards"]:
        s["path"] = str(dataset / s["path"])
        s["num_samples"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(lying))
    spec = spec_for(tmp_path, "arrow")
    with pytest.raises(ValueError, match="holds 5 rows but manifest.json says 6"):
        keys(RankData(spec).train_iterator(0), 1)
    with pytest.raises(ValueError, match="holds 5 samples but manifest.json says 6"):
        keys(RankData(spec_for(tmp_path, "webdataset")).train_iterator(0), 3)


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_packed_steps_hold_the_unpacked_steps_samples(dataset, fmt):
    """With packing a loader item is a rank's whole step: the same samples as the unpacked
    micro-batches of that step (the data position means the same), packed into full rows."""
    import dataclasses

    base = dataclasses.replace(spec_for(dataset, fmt, mbs=2, gbs=6), collate_fn=None)
    packed = dataclasses.replace(base, packing=True, micro_batch_size=1)
    unpacked_keys = keys(RankData(base).train_iterator(6), 3 * 3)
    steps = list(itertools.islice(RankData(packed).train_iterator(6), 3))
    for step, (batches, step_keys) in enumerate(steps):
        assert sorted(step_keys) == sorted(unpacked_keys[step * 6:(step + 1) * 6])
        assert sum(b.num_samples for b in batches) == 6
        # 30-position samples, two to a 64-position row: three rows, one micro-batch each
        assert len(batches) == 3 and all(b.tokens.shape == (1, 64) for b in batches)
        assert all(b.packing is not None and b.num_useful_positions == 60 for b in batches)


# -- data.group_by_modality_length -------------------------------------------------------------

def _mixed_samples(n_mm: int, n_text: int) -> list:
    """Caption samples of varied length; ``n_text`` of them without their image (text-only)."""
    samples = make_samples(n_mm + n_text, seed=3, caption_len=(3, 20))
    for s in samples[n_mm:]:
        keep = s["input_ids"] != -200
        s.update(input_ids=s["input_ids"][keep], labels=s["labels"][keep], images=[],
                 num_images=0)
    return samples


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    # 24 multimodal + 12 text-only = 36 samples: epochs do not start on step boundaries (gbs 8)
    write_dataset(str(root), _mixed_samples(24, 12), shard_size=7)
    return root


def modality_and_length(samples, spec):
    """Collation stand-in: (has image, length) per sample."""
    return [(len(s["images"]) > 0, len(s["input_ids"])) for s in samples]


def _grouped(root, dp_rank=0, workers=0, collate=modality_and_length, **kw):
    import dataclasses

    spec = spec_for(root, "arrow", dp_size=2, dp_rank=dp_rank, workers=workers, mbs=2, gbs=8)
    return dataclasses.replace(spec, group_by_modality_length=True, collate_fn=collate, **kw)


def test_grouped_micro_batches_are_homogeneous_and_each_epoch_is_a_permutation(mixed_dataset):
    steps, n = 18, 36  # four epochs
    per_rank = [list(itertools.islice(RankData(_grouped(mixed_dataset, r)).train_iterator(0),
                                      steps * 2)) for r in range(2)]
    for rank in per_rank:
        for batch, _ in rank:
            assert len({has_image for has_image, _ in batch}) == 1, batch  # one modality
    # the global order: each step is rank 0's slice, then rank 1's (2 micro-batches each)
    order = [k for b in range(steps) for r in range(2)
             for _, ks in per_rank[r][2 * b:2 * b + 2] for k in ks]
    for epoch in range(4):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == [f"test-{i:05d}" for i in range(n)]
    assert order[:n] != order[n:2 * n]  # a new grouping per epoch
    # lengths sorted within a step (longest first within each rank's slice of the step)
    lengths = [length for batch, _ in per_rank[0][2:4] for _, length in batch]
    assert lengths == sorted(lengths, reverse=True)


def test_grouping_resumes_bitwise_and_composes_with_workers_and_packing(mixed_dataset):
    import dataclasses

    spec = _grouped(mixed_dataset, collate=None)
    full = list(itertools.islice(RankData(spec).train_iterator(0), 20))
    resumed = list(itertools.islice(
        RankData(dataclasses.replace(spec, num_workers=2)).train_iterator(24), 14))
    for (a, ka), (b, kb) in zip(full[6:], resumed):  # 24 samples = 3 steps = 6 micro-batches
        assert ka == kb
        for field in ("tokens", "labels", "image_token_mask", "images"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    # packing: a loader item is a rank's step; the step's samples (over both ranks) are the
    # unpacked step's, dealt to the ranks one by one instead of by micro-batch
    other = list(itertools.islice(RankData(_grouped(mixed_dataset, 1, collate=None)).train_iterator(0), 10))
    steps_seen: list = []
    for r in range(2):
        packed = dataclasses.replace(_grouped(mixed_dataset, r, collate=None), packing=True,
                                     micro_batch_size=1)
        for step, (batches, keys_) in enumerate(itertools.islice(RankData(packed).train_iterator(0), 5)):
            if r == 0:
                step_keys = [k for _, ks in full[2 * step:2 * step + 2] + other[2 * step:2 * step + 2]
                             for k in ks]
                steps_seen.append(set(step_keys))
            assert set(keys_) <= steps_seen[step] and len(keys_) == 4
            has_image = {bool(b.image_token_mask.any()) for b in batches}
            assert len(has_image) == 1  # every packed micro-batch of the step: one modality


def test_grouping_mixes_at_most_one_micro_batch_per_epoch_and_refuses_webdataset(dataset):
    import dataclasses

    from pipeline.data.order import ModalityLengthGrouping, rank_positions

    rng = np.random.default_rng(0)
    n, mm = 50, np.zeros(50, bool)
    mm[rng.permutation(50)[:25]] = True  # 25 multimodal: the partial mega-batch is odd-sized
    order = ModalityLengthGrouping(rng.integers(5, 500, n), mm, seed=1, global_batch_size=8,
                                   unit=2, dp_size=2)
    mixed = []
    for r in range(2):
        it = rank_positions(0, 8, 2, 2, r)
        for _ in range(4 * n // 8 * 2):
            pos = next(it)
            if len({mm[order.item(p)] for p in pos}) > 1:
                mixed.append(pos[0] // n)
    assert len(mixed) == len(set(mixed)) <= 4  # never two in one epoch
    with pytest.raises(ValueError, match="data.group_by_modality_length.*WebDataset.*format=arrow"):
        RankData(dataclasses.replace(spec_for(dataset, "webdataset"), group_by_modality_length=True))
