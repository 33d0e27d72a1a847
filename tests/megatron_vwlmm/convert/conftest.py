"""Shared, session-scoped conversion runs (process launches are the expensive part, so every
check reads the results of three launches: imports, all layouts, the CLI export)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.convert import fixtures as fx

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ARCHS = ["llama", "mistral"]
TRAINER_ITER = "iter_0000007"


def make_llava_layout_dir(root: Path, name: str, llm_dir: Path, clip_dir: Path, projector: Path, *,
                          architecture: str, vm_head_seed: int | None, tower: bool = True,
                          **config_fields) -> Path:
    """A checkpoint in the LLaVA layout (MYTH-Lab VW-LMM, LLaVA-1.5), from the tiny sources:
    with a vm_head unless ``vm_head_seed`` is None, with the CLIP tower's weights if ``tower``."""
    from safetensors.torch import save_file

    from megatron_vwlmm.convert.hf_io import read_hf_tensors
    from megatron_vwlmm.convert.layouts import vision_keys

    out = root / name
    out.mkdir()
    state = dict(read_hf_tensors(llm_dir))
    if tower:
        for k, v in vision_keys(read_hf_tensors(clip_dir)).items():
            state["model.vision_tower.vision_tower.vision_model." + k] = v
    state.update(torch.load(projector))
    if vm_head_seed is not None:
        g = torch.Generator().manual_seed(vm_head_seed)
        state["vm_head.weight"] = 0.1 * torch.randn(fx.VOCAB, 64, generator=g)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    config = json.loads((llm_dir / "config.json").read_text())
    config.update(model_type="llava", architectures=[architecture], mm_vision_tower=str(clip_dir),
                  mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  tune_mm_mlp_adapter=False, rope_theta=500000.0, **config_fields)
    config.pop("rope_parameters", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_original_dir(root: Path, llm_dir: Path, clip_dir: Path, projector: Path) -> Path:
    """A checkpoint as MYTH-Lab published VW-LMM."""
    return make_llava_layout_dir(root, "original", llm_dir, clip_dir, projector,
                                 architecture="vwLlamaForCausalLM", vm_head_seed=5,
                                 freeze_mm_mlp_adapter=False, use_mm_proj=True)


# LLaVA-1.5 checkpoints: LLaVA's class and config fields; "llava15_vm" also carries a vm_head (a
# VW-LMM checkpoint saved under LLaVA's class name) and its tower, "llava15" neither (its tower
# comes from mm_vision_tower, as LLaVA-1.5 loads it).
LLAVA_VARIANTS = {"llava15_vm": dict(vm_head_seed=9, tower=True),
                  "llava15": dict(vm_head_seed=None, tower=False)}


def make_llava15_dir(root: Path, name: str, llm_dir: Path, clip_dir: Path, projector: Path):
    out = make_llava_layout_dir(root, name, llm_dir, clip_dir, projector,
                                architecture="LlavaLlamaForCausalLM", **LLAVA_VARIANTS[name],
                                tokenizer_model_max_length=2048, rope_scaling=None,
                                pretraining_tp=1)
    fx.make_tokenizer(out)
    return out


def _imports(root: str) -> dict:
    """One process: both HF imports and the original-layout import -> export round trip."""
    from megatron_vwlmm.convert.exporter import export_checkpoint
    from megatron_vwlmm.convert.importer import import_hf, import_original

    root = Path(root)
    for arch in ARCHS:
        import_hf(str(root / arch), str(root / "clip"), str(root / f"ck_{arch}"), tp=2, pp=2,
                  projector=str(root / "proj.bin"), seq_length=fx.SEQ,
                  vm_head_init="lm_head" if arch == "llama" else "random")
    import_original(str(root / "original"), str(root / "ck_original"), tp=2, pp=2,
                    seq_length=fx.SEQ)
    export_checkpoint(str(root / "ck_original"), str(root / "original_export"), format="vwlmm")
    for name in LLAVA_VARIANTS:  # recognised by weights and config, not by LLaVA's class name
        import_original(str(root / name), str(root / f"ck_{name}"), tp=2, pp=2, seq_length=fx.SEQ)
        export_checkpoint(str(root / f"ck_{name}"), str(root / f"{name}_export"), format="llava-hf")
    return {}


def _all_layouts(root: str) -> dict:
    """Four ranks; megatron's model-parallel groups rebuilt for each (TP, PP) in turn."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.parallel.initialize import set_seed

    b = fx.batch()
    results = {}
    for tp, pp in LAYOUTS:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        set_seed(1234)
        for arch in ARCHS:
            trainer_like = arch == "mistral" and (tp, pp) == (2, 2)
            save_to = str(Path(root) / "run" / "checkpoints" / TRAINER_ITER) if trainer_like else None
            out = fx.megatron_outputs(str(Path(root) / f"ck_{arch}"), b, with_loss=trainer_like,
                                      save_to=save_to)
            if out is not None and ps.get_data_parallel_rank() == 0:
                results[(arch, tp, pp)] = out
        if (tp, pp) == (2, 2):  # the LLaVA-1.5 imports, loaded at TP=2 x PP=2
            for name in LLAVA_VARIANTS:
                out = fx.megatron_outputs(str(Path(root) / f"ck_{name}"), b)
                if out is not None and ps.get_data_parallel_rank() == 0:
                    results[(name, tp, pp)] = out
    if dist.get_rank() == 0:
        (Path(root) / "run" / "checkpoints" / "latest").write_text(TRAINER_ITER + "\n")
    return results


@pytest.fixture(scope="session")
def conversion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    for arch in ARCHS:
        fx.make_llm_dir(root / arch, arch, seed=ARCHS.index(arch))
    fx.make_clip_dir(root / "clip")
    fx.make_projector(root / "proj.bin")
    make_original_dir(root, root / "llama", root / "clip", root / "proj.bin")
    for name in LLAVA_VARIANTS:
        make_llava15_dir(root, name, root / "llama", root / "clip", root / "proj.bin")
    run_on_ranks(_imports, 1, args=(str(root),), timeout_s=600)
    return root


@pytest.fixture(scope="session")
def reference_logits(conversion_root):
    b = fx.batch()
    return {arch: fx.hf_reference(conversion_root / arch, conversion_root / "clip",
                                  conversion_root / "proj.bin", b) for arch in ARCHS}


@pytest.fixture(scope="session")
def layout_outputs(conversion_root):
    merged = {}
    for rank_result in run_on_ranks(_all_layouts, 4, args=(str(conversion_root),), timeout_s=600):
        merged.update(rank_result or {})
    return merged


@pytest.fixture(scope="session")
def llava_export(conversion_root, layout_outputs):
    """The CLI export of the TP2xPP2 trainer-style checkpoint (follows `latest`)."""
    out = conversion_root / "llava"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vwlmm.convert.cli", "export", "--checkpoint",
         str(conversion_root / "run" / "checkpoints"), "--format", "llava-hf", "--out", str(out),
         "--tokenizer", str(conversion_root / "mistral")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
