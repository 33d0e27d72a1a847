"""Losses of VW-LMM: the vocab-parallel visual-word KL (the LM loss is megatron-core's CE)."""

from megatron_vwlmm.losses.vocab_parallel_kl import visual_word_kl

__all__ = ["visual_word_kl"]
