"""Image-token splicing and collation (pure functions, no distributed state)."""

from __future__ import annotations

import pytest
import torch

from megatron_vwlmm.model import collate_samples
from megatron_vwlmm.model.splicing import (
    scatter_image_features,
    splice_layout,
    visual_word_positions,
)


def test_splice_layout_expands_each_placeholder():
    ids = [1, 5, -200, 6, -200, 7]
    labels = [-100, -100, -100, 6, -100, 7]
    tokens, spliced_labels, mask = splice_layout(ids, labels, num_patches=3,
                                                 image_token_id=-200, pad_token_id=0)
    assert tokens.tolist() == [1, 5, 0, 0, 0, 6, 0, 0, 0, 7]
    assert spliced_labels.tolist() == [-100, -100, -100, -100, -100, 6, -100, -100, -100, 7]
    assert mask.tolist() == [False, False, True, True, True, False, True, True, True, False]


def test_collate_pads_orders_images_and_rejects_bad_samples():
    img = lambda v: torch.full((3, 2, 2), float(v))
    samples = [
        {"input_ids": [1, -200, 9], "labels": [-100, -100, 9], "images": [img(1)]},
        {"input_ids": [1, 4, 4], "labels": [-100, 4, 4], "images": []},
        {"input_ids": [1, -200, -200], "labels": [-100] * 3, "images": [img(2), img(3)]},
    ]
    batch = collate_samples(samples, seq_length=8, num_patches=2, pad_token_id=0)
    assert batch.tokens.shape == (3, 8) and batch.images.shape == (3, 3, 2, 2)
    assert batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch.image_token_mask.sum().item() == 6
    assert batch.labels[0].tolist() == [-100, -100, -100, 9, -100, -100, -100, -100]
    assert batch.num_lm_tokens == 3

    with pytest.raises(ValueError, match="sample #0: 1 image placeholders but 0 images"):
        collate_samples([{"input_ids": [1, -200], "labels": [-100, -100], "images": []}],
                        seq_length=8, num_patches=2, pad_token_id=0)
    with pytest.raises(ValueError, match=r"sample k7: 9 positions .* exceed seq_length 8"):
        collate_samples([{"key": "k7", "input_ids": [1] + [-200] * 4,
                          "labels": [-100] * 5, "images": [img(0)] * 4}],
                        seq_length=8, num_patches=2, pad_token_id=0)


def test_scatter_fills_flagged_rows_in_batch_major_order_and_is_differentiable():
    seq, batch, hidden = 5, 2, 3
    embeddings = torch.zeros(seq, batch, hidden)
    mask = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    features = torch.arange(4 * hidden, dtype=torch.float32).reshape(4, hidden).requires_grad_()
    out = scatter_image_features(embeddings, mask, features)
    assert out.shape == (seq, batch, hidden)
    rows = [out[1, 0], out[2, 0], out[0, 1], out[4, 1]]  # (position, sample) of each image row
    for index, row in enumerate(rows):
        assert torch.equal(row, features[index].detach())
    assert out[0, 0].abs().sum() == 0
    out.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features))


def test_visual_word_positions_skip_t0_and_point_one_back():
    mask = torch.tensor([[True, True, False], [False, True, True]])
    keep, (batch_index, prev) = visual_word_positions(mask)
    assert keep.tolist() == [False, True, True, True]
    assert batch_index.tolist() == [0, 1, 1] and prev.tolist() == [0, 0, 1]
