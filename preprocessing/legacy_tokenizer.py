"""Text encoding as LLaVA-1.5 trained: the SentencePiece model itself, segment by segment.

LLaVA loads the slow ``LlamaTokenizer`` (``use_fast=False``, legacy), which hands every text
segment to SentencePiece: a "▁" dummy prefix starts each segment and whitespace runs split by
the model's piece scores. Transformers' converted fast tokenizers disagree on whitespace (they
merge "▁▁" before "▁b", which SentencePiece scores last, and add no dummy prefix before a
leading space), so "A  b", indented code or a caption starting with a space would tokenize
differently from LLaVA's data. When the tokenizer folder ships its SentencePiece model
(``tokenizer.model``, as every Llama / Vicuna / Mistral repository does) ``load_text_tokenizer``
returns a ``SentencePieceSegments`` that encodes with it; token ids are the HF tokenizer's
(checked at load).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

SENTENCEPIECE_FILE = "tokenizer.model"
BACKENDS = ("auto", "sentencepiece", "fast")


def resolve_backend(backend: str, tokenizer_dir: str) -> str:
    """``auto`` -> ``sentencepiece`` when the folder holds a SentencePiece model, else ``fast``."""
    if backend == "auto":
        found = os.path.isfile(os.path.join(tokenizer_dir, SENTENCEPIECE_FILE))
        return "sentencepiece" if found else "fast"
    return backend


class SentencePieceSegments:
    """Encode text segments with SentencePiece (ids + character offsets), decode ids.

    Same call signature as a fast tokenizer, which ``preprocessing.templates`` relies on. A
    byte-fallback piece and the dummy prefix cover no character of their own: their offsets are
    the empty span at the character they belong to.
    """

    def __init__(self, model_file: str | os.PathLike, hf_tokenizer) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id, self.eos_token_id = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
        self.all_special_tokens = list(hf_tokenizer.all_special_tokens)
        ours = (self.sp.bos_id(), self.sp.eos_id())
        if ours != (self.bos_token_id, self.eos_token_id):
            raise ValueError(f"{model_file}: BOS/EOS ids {ours} differ from the HF tokenizer's "
                             f"{(self.bos_token_id, self.eos_token_id)}; not the same vocabulary")
        vocab = hf_tokenizer.get_vocab()
        size = self.sp.get_piece_size()
        sample = range(0, size, max(1, size // 64))
        if any(vocab.get(self.sp.id_to_piece(i)) != i for i in sample):
            raise ValueError(f"{model_file}: piece ids differ from the HF tokenizer's vocabulary")

    def __call__(self, text: str, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = True) -> dict:
        if add_special_tokens:
            raise ValueError("SentencePieceSegments encodes segments only (no BOS/EOS)")
        proto = self.sp.encode(text, return_type="proto")
        char_at = _byte_to_char(text)
        ids, offsets = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            offsets.append((char_at[piece.begin], char_at[piece.end]))
        return {"input_ids": ids, "offset_mapping": offsets}

    def decode(self, ids, **_: object) -> str:
        return self.sp.decode([int(i) for i in ids])


def _byte_to_char(text: str) -> dict[int, int]:
    """UTF-8 byte offset -> character offset, at every character boundary."""
    out, pos = {0: 0}, 0
    for i, ch in enumerate(text):
        pos += len(ch.encode())
        out[pos] = i + 1
    return out


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(tokenizer_dir: str, backend: str):
    """What ``preprocessing.templates.tokenize`` encodes with: the HF fast tokenizer or, for
    ``sentencepiece``, its SentencePiece model (cached per worker process)."""
    from preprocessing.tokenizer import load_tokenizer

    hf = load_tokenizer(tokenizer_dir)
    backend = resolve_backend(backend, tokenizer_dir)
    if backend == "fast":
        return hf
    model = Path(tokenizer_dir) / SENTENCEPIECE_FILE
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer_backend='sentencepiece': {model} does not exist")
    return SentencePieceSegments(model, hf)
