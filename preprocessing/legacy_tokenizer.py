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

The folder's ``tokenizer_config.json`` decides how the slow tokenizer treats text after a special
token (``preprocessing.tokenizer.slow_tokenizer_flags``). ``"legacy": true`` (or absent, the slow tokenizer's default):
every segment, also the one after ``</s>``, gets the dummy prefix. ``"legacy": false`` (many
Llama-2-era folders, Vicuna-7B-v1.5 among them): the text of one tokenizer call gets one "▁" in
front, and the text after a special token inside that call gets none, so ``</s>USER`` encodes
``USER`` where legacy encodes ``▁US ER``. LLaVA's ``preprocess_v1`` counts with that in mind
(one token less per later round); ``preprocessing.templates`` labels by characters, so both
values come out as LLaVA trains them.
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

    def __init__(self, model_file: str | os.PathLike, hf_tokenizer, legacy: bool = True) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        # templates.tokenize asks for ``after_special`` segments only when this is False
        self.prefix_after_special = legacy
        if not legacy:
            self.sp_bare = _without_dummy_prefix(model_file)
            self.unk_text = self.sp.id_to_piece(self.sp.unk_id())
            self.unk_length = len(self.sp_bare.encode(self.unk_text))
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
                 return_offsets_mapping: bool = True, after_special: bool = False) -> dict:
        """``after_special``: ``text`` follows a special token inside one slow-tokenizer call
        (no prefix when ``legacy`` is False)."""
        if add_special_tokens:
            raise ValueError("SentencePieceSegments encodes segments only (no BOS/EOS)")
        if self.prefix_after_special:
            return self._pieces(self.sp, text, text, 0, 0)
        # The slow tokenizer's non-legacy path: "▁" in front of a call's text (none after a
        # special token), "▁" in the text read as a space, and text starting with a space
        # encoded behind the unk token's text so that SentencePiece keeps that space.
        head = "" if after_special else "\u2581"
        encoded = head + text.replace("\u2581", " ")
        if not encoded.startswith(("\u2581", " ")):
            return self._pieces(self.sp_bare, encoded, text, 0, 0)
        return self._pieces(self.sp_bare, self.unk_text + encoded, text,
                            len(self.unk_text) + len(head), self.unk_length)

    @staticmethod
    def _pieces(sp, encoded: str, text: str, shift: int, skip: int) -> dict:
        """ids + offsets into ``text`` of ``encoded`` (= ``shift`` characters + ``text``),
        without its first ``skip`` pieces; offsets before ``text`` clamp to 0."""
        proto = sp.encode(encoded, return_type="proto")
        char_at = _byte_to_char(encoded)
        ids, offsets = [], []
        for piece in list(proto.pieces)[skip:]:
            ids.append(piece.id)
            offsets.append((max(0, char_at[piece.begin] - shift),
                            max(0, char_at[piece.end] - shift)))
        return {"input_ids": ids, "offset_mapping": offsets}

    def decode(self, ids, **_: object) -> str:
        return self.sp.decode([int(i) for i in ids])


def _without_dummy_prefix(model_file: str | os.PathLike):
    """The SentencePiece model with ``add_dummy_prefix`` off, as the non-legacy slow tokenizer
    loads it."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(Path(model_file).read_bytes())
    model.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.SerializeToString())
    return sp


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
    from preprocessing.tokenizer import load_tokenizer, slow_tokenizer_flags

    hf = load_tokenizer(tokenizer_dir)
    backend = resolve_backend(backend, tokenizer_dir)
    if backend == "fast":
        return hf
    model = Path(tokenizer_dir) / SENTENCEPIECE_FILE
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer_backend='sentencepiece': {model} does not exist")
    return SentencePieceSegments(model, hf, slow_tokenizer_flags(tokenizer_dir)["legacy"])
