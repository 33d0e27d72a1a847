"""Errors of the conversion tools: each names the file or field at fault and what to do."""

from __future__ import annotations

from megatron_vwlmm.convert.hf_configs import UnsupportedModelError


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint or HF folder lacks a file the conversion needs."""


class VocabMismatchError(ValueError):
    """The tokenizer does not fit the model's vocabulary."""


__all__ = ["IncompleteCheckpointError", "VocabMismatchError", "UnsupportedModelError"]
