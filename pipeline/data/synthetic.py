"""Synthetic tokenized datasets written exactly per the data contract (both formats, same samples).

For tests and benchmarks of the trainer. Independent of the preprocessing package on purpose:
the readers are checked against the contract (``vwlmm_data/contract.py``, WebDataset members
through ``vwlmm_data/samples.py``), not against the other side's writer; the benchmarks need
arbitrary sizes (336 px images, 2k-token sequences) without a tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import List, Tuple, Union

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from vwlmm_data.contract import (ARROW_SCHEMA, FORMAT_VERSION, IGNORE_INDEX, IMAGE_TOKEN_ID,
                                 Manifest, ShardInfo, Statistics, TokenizerInfo, VisionInfo,
                                 shard_name, write_manifest)
from vwlmm_data.samples import Sample, to_members


def make_samples(n: int, image_size: int = 32, seed: int = 0, vocab: int = 32000,
                 caption_len: Union[int, Tuple[int, int]] = 12) -> List[dict]:
    """``n`` caption samples: BOS, <image>, caption tokens (supervised), EOS.

    ``caption_len``: a fixed length, or an inclusive (low, high) range drawn per sample (the
    spread of real caption data, which sequence packing depends on).

    Each image is a smooth colour gradient whose colour is tied to the caption's first token,
    so a model can actually learn the mapping (the overfit test relies on it).
    """
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    for i in range(n):
        colour = rng.integers(0, 255, size=3)
        pixels = (colour[None, None, :] * (0.5 + 0.5 * yy[..., None] * xx[..., None]))
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=95)
        length = caption_len if isinstance(caption_len, int) else \
            int(rng.integers(caption_len[0], caption_len[1] + 1))
        caption = rng.integers(3, min(vocab, 1000), size=length).astype(np.int32)
        input_ids = np.concatenate([[1, IMAGE_TOKEN_ID], caption, [2]]).astype(np.int32)
        labels = np.concatenate([[IGNORE_INDEX, IGNORE_INDEX], caption, [2]]).astype(np.int32)
        out.append(dict(key=f"test-{i:05d}", source_id=str(i), images=[buf.getvalue()],
                        input_ids=input_ids, labels=labels, num_images=1, template="plain",
                        meta=json.dumps({"caption": f"sample {i}"})))
    return out


def write_dataset(root: str, samples: List[dict], shard_size: int, image_size: int = 32,
                  num_patches: int = 16, formats=("arrow", "webdataset"),
                  tokenizer: str = "test-tokenizer", template: str = "plain",
                  max_seq_len: int = 256, vocab_size: int = 32000,
                  vision_encoder: str = "clip") -> str:
    """Write ``samples`` as shards of ``shard_size`` plus manifest.json; returns ``root``.
    ``vocab_size`` is the tokenizer's and ``vision_encoder`` the encoder kind, as the manifest
    records them (the trainer checks both against the model's)."""
    os.makedirs(root, exist_ok=True)
    shards = []
    both = len(formats) == 2
    for fmt in formats:
        sub = {"arrow": "arrow", "webdataset": "webdataset"}[fmt] if both else ""
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for s, start in enumerate(range(0, len(samples), shard_size)):
            chunk = samples[start:start + shard_size]
            name = shard_name(s, fmt)
            rel = os.path.join(sub, name) if sub else name
            path = os.path.join(root, rel)
            ntok = [len(x["input_ids"]) - x["num_images"] + x["num_images"] * num_patches
                    for x in chunk]
            if fmt == "arrow":
                table = pa.table({
                    "key": [x["key"] for x in chunk],
                    "source_id": [x["source_id"] for x in chunk],
                    "images": [x["images"] for x in chunk],
                    "input_ids": [x["input_ids"].tolist() for x in chunk],
                    "labels": [x["labels"].tolist() for x in chunk],
                    "num_images": [x["num_images"] for x in chunk],
                    "num_tokens": ntok,
                    "template": [x["template"] for x in chunk],
                    "meta": [x["meta"] for x in chunk],
                }, schema=ARROW_SCHEMA)
                with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                    w.write_table(table, max_chunksize=3)  # several record batches per shard
            else:
                with wds.TarWriter(path, encoder=False) as w:
                    for x, nt in zip(chunk, ntok):
                        w.write(to_members(Sample(**x, num_tokens=nt)))
            shards.append(ShardInfo(path=rel, format=fmt, num_samples=len(chunk),
                                    num_tokens=int(sum(ntok))))
    lengths = [len(x["input_ids"]) - x["num_images"] + x["num_images"] * num_patches
               for x in samples]
    manifest = Manifest(
        format_version=FORMAT_VERSION, num_samples=len(samples), rejected={},
        shards=tuple(shards),
        statistics=Statistics(
            num_records=len(samples), num_tokens=sum(lengths), min_tokens=min(lengths),
            max_tokens=max(lengths), mean_tokens=sum(lengths) / len(samples),
            num_text_tokens=sum(len(x["input_ids"]) - x["num_images"] for x in samples),
            num_supervised_tokens=sum(int((x["labels"] != IGNORE_INDEX).sum()) for x in samples),
            num_images=sum(x["num_images"] for x in samples),
            num_text_only=sum(x["num_images"] == 0 for x in samples)),
        # A stand-in identity: tokenizers of different names count as different tokenizers.
        tokenizer=TokenizerInfo(name_or_path=tokenizer,
                                sha256=hashlib.sha256(tokenizer.encode()).hexdigest(),
                                vocab_size=vocab_size),
        template=template, image_token_id=IMAGE_TOKEN_ID, ignore_index=IGNORE_INDEX,
        image_size=image_size, image_mode="resize", num_patches_per_image=num_patches,
        max_seq_len=max_seq_len, formats=tuple(formats), config={}, vwlmm_version="synthetic",
        vision=VisionInfo.of(vision_encoder))
    write_manifest(root, manifest)
    return root
