"""HF Llama / Mistral(GQA) + CLIP -> megatron at every (TP, PP): logits equal the stock HF
models' on a batch with images (fp32, rel 1e-5)."""

from __future__ import annotations

import pytest

from tests.megatron_vwlmm.convert.conftest import ARCHS, LAYOUTS


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_hf(layout_outputs, reference_logits, arch, tp, pp):
    ours = layout_outputs[(arch, tp, pp)]["logits"]
    ref = reference_logits[arch]
    assert ours.shape == ref.shape
    print(f"import parity {arch} TP{tp} PP{pp}: rel {_rel(ours, ref):.2e}")
    assert _rel(ours, ref) <= 1e-5, (arch, tp, pp, _rel(ours, ref))


def test_source_config_fields_carried(conversion_root):
    import json

    meta = json.loads((conversion_root / "ck_mistral" / "vwlmm_config.json").read_text())
    d = meta["vwlmm_config"]["decoder"]
    assert (d["num_query_groups"], d["rotary_base"], d["norm_epsilon"]) == (2, 1e6, 1e-5)
    d = json.loads((conversion_root / "ck_llama" / "vwlmm_config.json").read_text())[
        "vwlmm_config"]["decoder"]
    assert (d["num_query_groups"], d["rotary_base"], d["norm_epsilon"]) == (4, 5e5, 1e-6)
    assert meta["layout"] == {"tp": 2, "pp": 2}
    assert (conversion_root / "ck_mistral" / "vision_tail.safetensors").is_file()
