"""The SigLIP run shared by the model and conversion tests (``siglip_run.py``)."""

from __future__ import annotations

import pytest

from megatron_vwlmm.parallel.launch import run_on_ranks


@pytest.fixture(scope="session")
def siglip_run(tmp_path_factory):
    """(source/export folder, the rank's results: ``features`` per feature layer, ``megatron``
    logits and losses of the LLM + SigLIP import)."""
    from tests.megatron_vwlmm import siglip_run as sr

    root = tmp_path_factory.mktemp("siglip")
    sr.make_sources(root)
    return root, run_on_ranks(sr.run, 1, args=(str(root),), timeout_s=600)[0]
