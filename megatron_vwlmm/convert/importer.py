"""Hugging Face -> megatron: an LLM + vision encoder (CLIP or SigLIP) pair, or a whole
LLaVA-layout checkpoint (VW-LMM's original release or LLaVA-1.5).

The source tensors are mapped to a full megatron state (``hf_mapping.hf_to_megatron``), loaded
into a TP1PP1 model in this process and saved as a reshardable dist checkpoint; ``tp``/``pp``
only validate the layout the trainer will load it into (head/vocab divisibility, layers per
stage) and are recorded. Parts the source lacks keep the model's seeded initialisation
(adapter, unless ``projector`` gives LLaVA's stage-1 ``mm_projector`` weights; VM head when
``vm_head_init="random"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron_vwlmm.convert import layouts
from megatron_vwlmm.convert.errors import UnsupportedModelError, VocabMismatchError
from megatron_vwlmm.convert.hf_configs import (
    ORIGINAL_ARCHITECTURES,
    decoder_architecture,
    original_decoder_family,
    vision_config_of,
    vwlmm_config_from_hf,
)
from megatron_vwlmm.convert.hf_io import read_hf_tensors, read_tensor_file
from megatron_vwlmm.convert.hf_mapping import hf_to_megatron
from megatron_vwlmm.convert.megatron_io import (
    full_model,
    megatron_process,
    model_state,
    save_checkpoint,
)
from megatron_vwlmm.model.config import VWLMMConfig

log = logging.getLogger(__name__)
VM_HEAD_INITS = ("lm_head", "random")


def _auto_config(folder: Path, what: str):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json ({what} must be a HF model folder)")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (KeyError, ValueError) as exc:
        raise UnsupportedModelError(f"{folder}/config.json: unknown model type ({exc})") from exc


def check_tokenizer_fits(folder: Path, vocab_size: int) -> Optional[int]:
    """Length of the tokenizer in ``folder`` (if any); refuses one larger than the vocabulary."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(folder)))
    if size > vocab_size:
        raise VocabMismatchError(
            f"{folder}: the tokenizer has {size} tokens but the model's vocab_size is "
            f"{vocab_size}; its ids would index past the embedding table")
    return size


def _llm_components(llm_dir: Path, llm_config) -> Dict[str, torch.Tensor]:
    tensors = read_hf_tensors(llm_dir)
    llm = {k: v for k, v in tensors.items() if k.startswith("model.") or k == "lm_head.weight"}
    if "lm_head.weight" not in llm:
        if not getattr(llm_config, "tie_word_embeddings", False):
            raise UnsupportedModelError(f"{llm_dir}: no lm_head.weight and embeddings not tied")
        llm["lm_head.weight"] = llm["model.embed_tokens.weight"]
    return llm


def _projector_components(path: Optional[str]) -> Dict[str, torch.Tensor]:
    """LLaVA stage-1 projector weights (``model.mm_projector.{0,2}.*`` or bare ``{0,2}.*``)."""
    if not path:
        return {}
    state = read_tensor_file(path)
    out = {k.split("mm_projector.")[-1]: v for k, v in state.items()}
    expected = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(out) != expected:
        raise UnsupportedModelError(
            f"{path}: expected an mlp2x_gelu projector {sorted(expected)}, found {sorted(out)}")
    return out


def _build_and_save(components, config: VWLMMConfig, out_dir, *, tp: int, pp: int,
                    vm_head_init: str, source: Dict[str, Any], vision_tail) -> Path:
    config.validate(tp, pp)
    state = hf_to_megatron(components, config)
    if vm_head_init == "lm_head" and "vm_head.weight" not in state:
        # Paper Sec. 3: the VM head starts as a copy of the LLM's LM head.
        state["vm_head.weight"] = state["language_model.output_layer.weight"].clone()
    with megatron_process():
        model = full_model(config)
        own = model_state(model)
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise UnsupportedModelError(f"source tensors without a place in the model: {unexpected[:5]}")
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise UnsupportedModelError(
                    f"{name}: source shape {tuple(value.shape)} != model {tuple(own[name].shape)}")
        kept_init = sorted(set(own) - set(state))
        log.info("kept the model's initialisation for %d tensors: %s", len(kept_init),
                 ", ".join(kept_init[:6]) + (" ..." if len(kept_init) > 6 else ""))
        model.load_state_dict({**own, **state}, strict=True)
        source = {**source, "initialised_randomly": kept_init, "vm_head_init": vm_head_init}
        return save_checkpoint(model, config, out_dir, layout={"tp": tp, "pp": pp},
                               source=source, vision_tail=vision_tail)


def import_hf(llm_dir: str, vision_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1,
              vm_head_init: str = "lm_head", projector: Optional[str] = None,
              seq_length: Optional[int] = None, **config_changes: Any) -> Path:
    """HF Llama/Vicuna/Mistral causal LM + HF CLIP or SigLIP vision model -> megatron checkpoint
    in ``out_dir`` (the encoder kind is read from the vision config)."""
    if vm_head_init not in VM_HEAD_INITS:
        raise ValueError(f"vm_head_init: {vm_head_init!r} is not one of {VM_HEAD_INITS}")
    llm_path, vision_path = Path(llm_dir), Path(vision_dir)
    llm_config = _auto_config(llm_path, "--llm")
    architecture = decoder_architecture(llm_config, f"{llm_path}/config.json")
    vision_config = vision_config_of(_auto_config(vision_path, "--vision"),
                                     f"{vision_path}/config.json")
    config = vwlmm_config_from_hf(llm_config, vision_config, seq_length=seq_length,
                                  name=f"hf-{architecture}", **config_changes)
    config.validate(tp, pp)
    check_tokenizer_fits(llm_path, config.decoder.vocab_size)
    vision = layouts.vision_keys(read_hf_tensors(vision_path))
    vision, tail = layouts.split_vision_tail(vision, config.vision.num_layers_run)
    components = {"llm": _llm_components(llm_path, llm_config), "vision": vision,
                  "projector": _projector_components(projector), "vm_head": {}}
    source = {
        "format": "hf", "architecture": architecture, "llm": str(llm_path.resolve()),
        "vision": str(vision_path.resolve()), "projector": projector,
        "llm_config": llm_config.to_dict(), "vision_config": vision_config.to_dict(),
        "mm_vision_tower": getattr(vision_config, "_name_or_path", "") or str(vision_path.resolve()),
    }
    return _build_and_save(components, config, out_dir, tp=tp, pp=pp, vm_head_init=vm_head_init,
                           source=source, vision_tail=tail)


def _original_vision_config(config: dict, folder: Path, vision_dir: Optional[str]):
    """The vision config of an original-layout checkpoint: --vision, else ``mm_vision_tower``
    as a local folder, else the ``vwlmm_vision_config`` our export adds, else a known hub name
    (``megatron_vwlmm/vision/hf_formats.py``)."""
    from megatron_vwlmm.vision.hf_formats import HF_FORMATS

    if vision_dir:
        return vision_config_of(_auto_config(Path(vision_dir), "--vision"), vision_dir)
    tower = config.get("mm_vision_tower") or ""
    if tower and (Path(tower) / "config.json").is_file():
        return vision_config_of(_auto_config(Path(tower), "mm_vision_tower"), tower)
    saved = config.get("vwlmm_vision_config")
    if saved:
        model_type = saved.get("model_type")
        for fmt in HF_FORMATS:
            if model_type == fmt.model_types[0]:
                return fmt.config_from_dict(saved)
        raise UnsupportedModelError(f"{folder}/config.json: vwlmm_vision_config has model_type "
                                    f"{model_type!r}, not a supported vision model")
    for fmt in HF_FORMATS:
        if tower in fmt.known_towers:
            return fmt.config_from_dict(fmt.known_towers[tower])
    known = sorted(t for fmt in HF_FORMATS for t in fmt.known_towers)
    raise UnsupportedModelError(
        f"{folder}/config.json: mm_vision_tower {tower!r} is neither a local folder nor a known "
        f"tower ({known}); pass --vision <vision model folder> for its config")


def _pif_of(src: Path, raw: dict, pif: Optional[bool]) -> bool:
    """PIF is not in the weights: ``pif`` when given, else VW-LMM's own rule (its loader builds
    the PIF class when the model name, the folder name, contains "pif") or the class name our
    ``--format vwlmm`` export writes."""
    if pif is not None:
        return pif
    name = src.resolve().name
    if name.startswith("checkpoint-"):  # VW-LMM / LLaVA get_model_name_from_path
        name = src.resolve().parent.name + "_" + name
    return "pif" in name or ORIGINAL_ARCHITECTURES[("llama", True)] in (raw.get("architectures") or [])


def import_original(src_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1,
                    vision_dir: Optional[str] = None, seq_length: Optional[int] = None,
                    pif: Optional[bool] = None, vm_head_init: str = "lm_head") -> Path:
    """A LLaVA-layout checkpoint -> a megatron checkpoint, recognised by its weights and config
    fields, whatever its ``architectures`` says.

    ``model.*`` + ``lm_head`` (Llama or Mistral, read from the config) + ``model.mm_projector``
    (mlp2x_gelu) + the vision tower, CLIP or SigLIP (``model.vision_tower.vision_tower.*``, or
    from ``vision_dir`` / a local ``mm_vision_tower`` when the checkpoint leaves it out, as
    LLaVA-1.5 may). With a
    ``vm_head`` it is a VW-LMM checkpoint, imported whole; without one (LLaVA-1.5) the VM head
    starts per ``vm_head_init``. ``pif``: see ``_pif_of``."""
    from transformers import LlamaConfig, MistralConfig

    if vm_head_init not in VM_HEAD_INITS:
        raise ValueError(f"vm_head_init: {vm_head_init!r} is not one of {VM_HEAD_INITS}")
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a VW-LMM / LLaVA model folder)")
    where = f"{src}/config.json"
    raw = json.loads((src / "config.json").read_text())
    architecture = original_decoder_family(raw, where)
    pif = _pif_of(src, raw, pif)
    if pif and architecture != "llama":
        raise UnsupportedModelError(f"{where}: VW-LMM's PIF model exists for Llama only, this "
                                    "is a Mistral checkpoint (pass --no-pif)")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    llm_config = (MistralConfig if architecture == "mistral" else LlamaConfig)(**fields)
    decoder_architecture(llm_config, where)
    vision_config = _original_vision_config(raw, src, vision_dir)
    config = vwlmm_config_from_hf(llm_config, vision_config, seq_length=seq_length,
                                  feature_layer=raw.get("mm_vision_select_layer", -2), pif=pif,
                                  name=f"vwlmm-{architecture}")
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu" or \
            raw.get("mm_vision_select_feature", "patch") != "patch":
        raise UnsupportedModelError(
            f"{where}: mm_projector_type {raw.get('mm_projector_type')!r} / "
            f"mm_vision_select_feature {raw.get('mm_vision_select_feature')!r}; only mlp2x_gelu "
            "with patch features is supported")
    config.validate(tp, pp)
    check_tokenizer_fits(src, config.decoder.vocab_size)
    components = layouts.from_original(read_hf_tensors(src))
    if not components["projector"]:
        raise UnsupportedModelError(
            f"{src}: no model.mm_projector.* weights, so not a LLaVA-layout checkpoint (import an "
            "LLM alone with --llm and --vision)")
    vision_from = str(src.resolve())
    if not components["vision"]:
        components["vision"], vision_from = _tower_weights(raw, src, vision_dir)
    vision, tail = layouts.split_vision_tail(components["vision"], config.vision.num_layers_run)
    components["vision"] = vision
    has_vm_head = bool(components["vm_head"])
    source = {"format": "vwlmm" if has_vm_head else "llava", "architecture": architecture,
              "vwlmm": str(src.resolve()), "original_config": raw,
              "llm_config": llm_config.to_dict(), "vision_config": vision_config.to_dict(),
              "vision_weights": vision_from, "mm_vision_tower": raw.get("mm_vision_tower", "")}
    log.info("%s: %s layout, %s decoder, pif=%s, VM head %s", src,
             "VW-LMM" if has_vm_head else "LLaVA", architecture, pif,
             "from the checkpoint" if has_vm_head else f"initialised ({vm_head_init})")
    return _build_and_save(components, config, out_dir, tp=tp, pp=pp,
                           vm_head_init="source" if has_vm_head else vm_head_init,
                           source=source, vision_tail=tail)


def _tower_weights(raw: dict, src: Path, vision_dir: Optional[str]):
    """(vision tensors, where from) for a checkpoint that does not carry its vision tower."""
    tower = raw.get("mm_vision_tower") or ""
    for folder in (vision_dir, tower):
        if folder and (Path(folder) / "config.json").is_file():
            return layouts.vision_keys(read_hf_tensors(folder)), str(Path(folder).resolve())
    raise UnsupportedModelError(
        f"{src}: the checkpoint holds no vision tower weights and mm_vision_tower {tower!r} is "
        "not a local folder; pass --vision <vision model folder>")
