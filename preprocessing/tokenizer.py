"""Tokenizer loading, identity hashing, and the Mistral SentencePiece -> HF converter.

The converter exists so tests, the demo and the benchmark use a *real* 32000-piece Llama-family
tokenizer without network access: the ``mistral_common`` wheel ships Mistral-7B's original
SentencePiece model (``data/tokenizer.model.v1``), which transformers converts (via
``sentencepiece`` + ``protobuf``) into a fast ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from preprocessing.schema import TokenizerInfo


def mistral_sentencepiece_path() -> Path:
    """Path of Mistral-7B v0.1's SentencePiece model inside the installed mistral_common wheel."""
    try:
        import mistral_common
    except ImportError as exc:  # dev extra; say how to get it
        raise ImportError("mistral_common is needed: pip install -e .[dev]") from exc
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this mistral_common release no longer ships it")
    return path


def build_mistral_hf_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face tokenizer directory converted from Mistral's SentencePiece model,
    with the model itself as ``tokenizer.model`` (as Hugging Face Mistral repositories ship it;
    preprocessing encodes with it exactly as LLaVA's slow tokenizer did).

    Idempotent: an existing ``tokenizer.json`` in ``out_dir`` is kept (a missing
    ``tokenizer.model`` is added). Returns ``out_dir``.
    """
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        if not (out / "tokenizer.model").is_file():
            shutil.copyfile(mistral_sentencepiece_path(), out / "tokenizer.model")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_sentencepiece_path(), Path(tmp) / "tokenizer.model")
        # legacy=False: the non-legacy Llama handling of spaces after special tokens, as
        # Mistral's own tokenizer_config does.
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
        if len(tok) != 32000:
            raise RuntimeError(f"conversion produced {len(tok)} pieces, expected 32000")
        staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent if out.parent.exists() else None))
        tok.save_pretrained(staging)
        shutil.copyfile(mistral_sentencepiece_path(), staging / "tokenizer.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A fast tokenizer (offsets are needed to build label masks), cached per worker process."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer {path!r} is not a directory; build one with "
            "`vwlmm-preprocess build-tokenizer OUT_DIR` or pass a HF tokenizer folder"
        )
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {path!r} is not a fast tokenizer (offset mapping needed)")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no BOS/EOS token")
    return tok


def tokenizer_identity(path: str) -> TokenizerInfo:
    """Name + sha256 over every file of the tokenizer folder (names and contents, sorted)."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    tok = load_tokenizer(path)
    return TokenizerInfo(name_or_path=str(path), sha256=digest.hexdigest(), vocab_size=len(tok))
