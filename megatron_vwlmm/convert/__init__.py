"""Hugging Face import/export of VW-LMM checkpoints, verified by logit parity."""
