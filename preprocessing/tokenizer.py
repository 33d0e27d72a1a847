"""Tokenizer loading, identity hashing, the folder's encoding flags as LLaVA's slow tokenizer
reads them, and the Mistral SentencePiece -> HF converter.

The converter exists so tests, the demo and the benchmark use a *real* 32000-piece Llama-family
tokenizer without network access: the ``mistral_common`` wheel ships Mistral-7B's original
SentencePiece model (``data/tokenizer.model.v1``), which transformers converts (via
``sentencepiece`` + ``protobuf``) into a fast ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from vwlmm_data.contract import TokenizerInfo
from vwlmm_data.storage import default_dir_mode


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


# Beside the files of a folder ``build_mistral_hf_tokenizer`` wrote: what makes it ours to complete.
BUILD_MARKER = ".vwlmm-build-tokenizer"


def build_mistral_hf_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face tokenizer directory converted from Mistral's SentencePiece model,
    with the model itself as ``tokenizer.model`` (as Hugging Face Mistral repositories ship it;
    preprocessing encodes with it exactly as LLaVA's slow tokenizer did).

    Never deletes or changes a folder it did not write: an existing ``tokenizer.json`` in
    ``out_dir`` is kept as it is (a missing ``tokenizer.model`` is added only to a folder this
    function wrote, ``BUILD_MARKER``), and any other non-empty ``out_dir`` is refused with
    ``FileExistsError``. The folder is built beside ``out_dir`` and renamed into place, so it
    appears complete or not at all. Returns ``out_dir``.
    """
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if (out / "tokenizer.json").is_file():
        if (out / BUILD_MARKER).is_file() and not (out / "tokenizer.model").is_file():
            shutil.copyfile(mistral_sentencepiece_path(), out / "tokenizer.model")
        return out
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no tokenizer.json: refusing to "
                              "replace it; give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent))
    try:
        staging.chmod(default_dir_mode())  # mkdtemp's 0700 would stay on the published folder
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(mistral_sentencepiece_path(), Path(tmp) / "tokenizer.model")
            # legacy=False: the non-legacy Llama handling of spaces after special tokens, as
            # Mistral's own tokenizer_config does.
            tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
            if len(tok) != 32000:
                raise RuntimeError(f"conversion produced {len(tok)} pieces, expected 32000")
            tok.save_pretrained(staging)
        shutil.copyfile(mistral_sentencepiece_path(), staging / "tokenizer.model")
        (staging / BUILD_MARKER).write_text("written by vwlmm-preprocess build-tokenizer\n")
        os.replace(staging, out)  # onto a missing or empty folder only (checked above)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# The tokenizer_config.json keys LLaVA's pinned slow LlamaTokenizer reads, with its defaults.
# ``add_prefix_space`` is recorded only: that tokenizer does not read it.
SLOW_TOKENIZER_DEFAULTS = {"legacy": True, "add_bos_token": True, "add_eos_token": False,
                           "add_prefix_space": None}


def slow_tokenizer_flags(tokenizer_dir: str) -> dict:
    """The encoding flags of the folder as LLaVA's slow tokenizer applies them (defaults for
    absent or null keys); recorded in the manifest's ``tokenizer.encoding``.

    Refused: ``add_bos_token: false`` and ``add_eos_token: true``. ``preprocess_v1`` counts one
    BOS per segment and no EOS, so with either flag LLaVA masks every multi-segment sample."""
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    flags = {k: (default if config.get(k) is None else config[k])
             for k, default in SLOW_TOKENIZER_DEFAULTS.items()}
    for key in ("legacy", "add_bos_token", "add_eos_token"):
        if not isinstance(flags[key], bool):
            raise ValueError(f"{path}: {key!r} must be true or false, got {flags[key]!r}")
    if not flags["add_bos_token"] or flags["add_eos_token"]:
        raise ValueError(f"{path}: add_bos_token={flags['add_bos_token']}, add_eos_token="
                         f"{flags['add_eos_token']}: LLaVA's label counting needs BOS before and "
                         "no EOS after each segment (it masks every sample otherwise)")
    return flags



# The files that decide how a Hugging Face tokenizer encodes, besides its class's vocabulary
# files (``vocab_files_names``: tokenizer.json, tokenizer.model, vocab.json, merges.txt, ...).
_TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                           "chat_template.jinja", "chat_template.json")
# No tokenizer file comes near this; a bigger one is not a tokenizer file.
MAX_TOKENIZER_FILE_BYTES = 1 << 30


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


def tokenizer_files(path: str, tok) -> list[str]:
    """The names of the files of ``path`` that define ``tok`` (never model weights)."""
    names = set(_TOKENIZER_CONFIG_FILES) | set(type(tok).vocab_files_names.values())
    slow = getattr(tok, "slow_tokenizer_class", None)
    if slow is not None:
        names |= set(slow.vocab_files_names.values())
    return sorted(n for n in names if os.path.isfile(os.path.join(path, n)))


def tokenizer_identity(path: str, backend: str | None = None) -> TokenizerInfo:
    """Name + sha256 over the tokenizer's own files (names and contents, sorted), and what the
    resolved ``backend`` (``PreprocessConfig.tokenizer_backend``) encodes with: for
    ``sentencepiece``, the folder's ``slow_tokenizer_flags`` (None: not recorded).

    Only ``tokenizer_files``: a model folder used as the tokenizer (``--tokenizer
    /models/vicuna-7b``) also holds gigabytes of weights, which do not change the encoding.
    Files are hashed as streams, each bounded by ``MAX_TOKENIZER_FILE_BYTES``.
    """
    tok = load_tokenizer(path)
    digest = hashlib.sha256()
    for name in tokenizer_files(path, tok):
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise ValueError(f"tokenizer file {full} has {size} bytes: too large for a tokenizer "
                             f"file (limit {MAX_TOKENIZER_FILE_BYTES})")
        digest.update(name.encode() + b"\0")
        with open(full, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    encoding = {} if backend is None else {
        "backend": backend, **(slow_tokenizer_flags(path) if backend == "sentencepiece" else {})}
    return TokenizerInfo(name_or_path=str(path), sha256=digest.hexdigest(), vocab_size=len(tok),
                         encoding=encoding)
