"""What every benchmark test needs: the isolated lmms-eval environment, and no Hugging Face hub.

``make test`` creates the environment first (``make eval-env``); a suite run without it fails
with the one-line message that says how to create it. The hub is never reached: the tests run
with ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` and a throwaway ``HF_HOME``, so a task
whose dataset is not local fails instead of downloading.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vwlmm_data.errors import Refusal


@pytest.fixture(scope="session")
def eval_python() -> Path:
    """The python of the isolated lmms-eval environment (``pipeline/eval_env.py``)."""
    from pipeline.eval_env import eval_python as find

    try:
        return find()
    except Refusal as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="package", autouse=True)
def offline_hf(tmp_path_factory):
    """Offline Hugging Face settings for this process and every process it starts, while the
    tests of this folder run."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
