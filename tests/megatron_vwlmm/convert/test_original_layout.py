"""Original VW-LMM layout: import (whole model) -> export gives back identical tensors and
config fields; the CLIP layer after the feature layer travels beside the checkpoint."""

from __future__ import annotations

import json

import torch


def test_round_trip_tensors_identical(conversion_root):
    from safetensors.torch import load_file

    source = load_file(str(conversion_root / "original" / "model.safetensors"))
    exported = load_file(str(conversion_root / "original_export" / "model.safetensors"))
    assert set(exported) == set(source)
    different = [k for k in source if not torch.equal(source[k], exported[k])]
    assert different == []


def test_round_trip_config_fields_identical(conversion_root):
    source = json.loads((conversion_root / "original" / "config.json").read_text())
    exported = json.loads((conversion_root / "original_export" / "config.json").read_text())
    changed = {k: (v, exported.get(k)) for k, v in source.items() if exported.get(k) != v}
    assert changed == {}
