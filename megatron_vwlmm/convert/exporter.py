"""megatron -> Hugging Face: llava-hf (stock transformers) or the original VW-LMM layout.

The checkpoint (any TP/PP; an import directory or a trainer checkpoint) is loaded into one TP1PP1
model in this process; ``hf_mapping.megatron_to_hf`` gives views of its tensors under HF names and
``hf_io.write_hf_tensors`` writes them shard by shard, so the model is held once plus one shard.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_vwlmm.convert import layouts
from megatron_vwlmm.convert.hf_configs import (
    llava_hf_config,
    original_vwlmm_config,
    vision_hf_config,
)
from megatron_vwlmm.convert.hf_io import write_hf_tensors
from megatron_vwlmm.convert.hf_mapping import megatron_to_hf
from megatron_vwlmm.convert.megatron_io import (
    CheckpointSource,
    load_checkpoint,
    megatron_process,
    model_state,
    resolve_checkpoint,
)
from megatron_vwlmm.convert.processor import (
    build_processor,
    default_template,
    find_tokenizer_dir,
    load_tokenizer_with_image_token,
)

log = logging.getLogger(__name__)
FORMATS = ("llava-hf", "vwlmm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _architecture(source: CheckpointSource) -> str:
    arch = source.conversion.get("architecture")
    if arch:
        return arch
    # Checkpoints without conversion metadata: the config name ("mistral-7b" preset,
    # "hf-mistral" import) names the decoder family.
    return "mistral" if "mistral" in source.config.name else "llama"


def _full_vision(components: Dict, source: CheckpointSource) -> None:
    """Re-attach the vision layers after the feature layer (see ``layouts.split_vision_tail``)."""
    v = source.config.vision
    tail = source.vision_tail()
    if not tail:
        log.warning("no vision_tail.safetensors for %s: vision layers %d.. and post_layernorm "
                    "are written as identity layers (outputs unaffected)", source.path,
                    v.num_layers_run)
        tail = layouts.identity_vision_tail(components["vision"], v.num_layers_run, v.num_layers)
    components["vision"].update(tail)


def _has_vision_head(components: Dict) -> bool:
    """Whether the vision tensors include a pooling head (a SigLIP tower imported with one)."""
    return any(key.startswith("head.") for key in components["vision"])


def _tokenizer_dir(given: Optional[str], source: CheckpointSource) -> Optional[Path]:
    """``--tokenizer``, else the tokenizer the checkpoint's provenance records."""
    recorded = source.provenance.tokenizer
    found = find_tokenizer_dir(given, recorded)
    if found is None and recorded and not given:
        log.warning("the tokenizer recorded for %s (%s) is gone; pass --tokenizer", source.path,
                    recorded)
    return found


def _append_image_row(components: Dict, vocab: int, rows: int) -> None:
    """Grow embeddings and LM head to ``rows`` rows; new rows are the mean row (as transformers'
    ``resize_token_embeddings(mean_resizing=True)``); generation suppresses the token."""
    llm = components["llm"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        table = llm[key]
        extra = table.mean(dim=0, keepdim=True).expand(rows - vocab, -1)
        llm[key] = torch.cat([table, extra], dim=0)


def _export_llava(components, source, out: Path, dtype, tokenizer_dir, template) -> None:
    from transformers import GenerationConfig

    config, arch = source.config, _architecture(source)
    vocab = config.decoder.vocab_size
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, source)
    tokenizer = None
    if tokenizer_dir is None:
        log.warning("no tokenizer given or found: the export has no processor (pass "
                    "--tokenizer); <image> is given id %d", vocab)
        image_token_id = vocab
    else:
        tokenizer, image_token_id = load_tokenizer_with_image_token(tokenizer_dir, vocab)
    rows = max(vocab, image_token_id + 1)
    if rows > vocab:
        _append_image_row(components, vocab, rows)
    hf_config = llava_hf_config(config, arch, image_token_index=image_token_id,
                                text_vocab_size=rows, source=source.conversion.get("llm_config"),
                                vision_head=_has_vision_head(components))
    hf_config.architectures = ["LlavaForConditionalGeneration"]
    hf_config.dtype = str(dtype).replace("torch.", "")
    hf_config.save_pretrained(out)
    text = hf_config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                     pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
                     suppress_tokens=[image_token_id]).save_pretrained(out)
    write_hf_tensors(layouts.to_llava_hf(components), out, dtype=dtype, progress=_progress)
    if tokenizer is not None:
        template = template or default_template(arch)
        build_processor(tokenizer, config, template).save_pretrained(out)


def _export_original(components, source, out: Path, dtype, tokenizer_dir) -> None:
    config, arch = source.config, _architecture(source)
    original = source.conversion.get("original_config")
    tower = source.conversion.get("mm_vision_tower") or ""
    hf = original_vwlmm_config(config, arch, mm_vision_tower=tower or str(out / "vision_tower"),
                               source=original)
    vision_config = vision_hf_config(config, with_head=_has_vision_head(components))
    if not original:
        # Lets `vwlmm-convert import --vwlmm` rebuild the vision config without the tower folder.
        hf["vwlmm_vision_config"] = vision_config.to_dict()
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
    if not tower:
        (out / "vision_tower").mkdir(parents=True, exist_ok=True)
        vision_config.save_pretrained(out / "vision_tower")
        write_hf_tensors({"vision_model." + k: v for k, v in components["vision"].items()},
                         out / "vision_tower", dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    write_hf_tensors(layouts.to_original(components), out, dtype=dtype, progress=_progress)
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, source)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)


def _progress(done: int, total: int) -> None:
    log.info("wrote shard %d/%d", done, total)


def export_checkpoint(checkpoint_dir: str, out_dir: str, format: str = "llava-hf",
                      tokenizer_dir: Optional[str] = None, dtype: str = "fp32",
                      template: Optional[str] = None) -> Path:
    """Export a megatron VW-LMM checkpoint (any TP/PP) to a Hugging Face folder.

    ``checkpoint_dir``: a ``vwlmm-convert import`` output, a trainer ``iter_*`` checkpoint, its
    checkpoint root (``latest`` is followed) or the run directory. ``format``: ``llava-hf`` or
    ``vwlmm`` (the original layout). ``tokenizer_dir``: the HF tokenizer of the model (default:
    the one of the imported LLM, if any); ``template``: chat template (vicuna_v1 | mistral).
    """
    if format not in FORMATS:
        raise ValueError(f"format: {format!r} is not one of {FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    source = resolve_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    log.info("loading %s (%s)", source.path, source.config.name)
    try:
        with megatron_process():
            model = load_checkpoint(source)
            components = megatron_to_hf(model_state(model), source.config)
            _full_vision(components, source)
            if format == "llava-hf":
                _export_llava(components, source, out, DTYPES[dtype], tokenizer_dir, template)
            else:
                _export_original(components, source, out, DTYPES[dtype], tokenizer_dir)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written export behind
        raise
    log.info("exported %s -> %s (%s, %s)", source.path, out, format, dtype)
    return out
