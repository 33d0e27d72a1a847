"""VW-LMM (visual words LMM) on megatron-core: model, vocab-parallel losses, HF conversion."""

__version__ = "0.1.0"
