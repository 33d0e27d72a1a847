"""megatron -> Hugging Face: llava-hf (stock transformers) or the original VW-LMM layout.

The checkpoint (any TP/PP; an import directory or a trainer checkpoint) is loaded into one TP1PP1
model in this process; ``hf_mapping.megatron_to_hf`` gives views of its tensors under HF names and
``hf_io.write_hf_tensors`` writes them shard by shard, so the model is held once plus one shard.

The tokenizer and chat template come from what the checkpoint records, so an export of any run
carries a processor without flags: the imported model's tokenizer (``Provenance.tokenizer``)
when the weights descend from an import, else the tokenizer folder the run's data was
preprocessed with (``data_tokenizer``) and that data's template (its ``manifest.json``). A
folder named with ``--tokenizer`` must exist; a recorded one that is gone is reported in one line
and the export is written without a processor.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from megatron_vwlmm.checkpoint.metadata import TOKENIZER_KEY, TRAIN_CONFIG_KEY
from megatron_vwlmm.checkpoint.safe_read import read_common
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
    CHAT_TEMPLATES,
    build_processor,
    default_template,
    is_tokenizer_dir,
    load_tokenizer_with_image_token,
    require_tokenizer_dir,
)
from vwlmm_data.contract import load_manifest

log = logging.getLogger(__name__)
FORMATS = ("llava-hf", "vwlmm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunData:
    """What a checkpoint records of the data its weights were trained on (nothing for an
    import): the tokenizer folder preprocessing was given and the data's template."""

    tokenizer: Optional[str] = None
    template: Optional[str] = None


def run_data(source: CheckpointSource) -> RunData:
    """The tokenizer from ``data_tokenizer`` (else the manifest's), the template from the
    manifest at the run config's ``data.path``. A manifest that cannot be read costs only the
    template (one warning): the export then uses the decoder family's."""
    common = read_common(source.path)
    recorded = common.get(TOKENIZER_KEY) or {}
    train = common.get(TRAIN_CONFIG_KEY)
    data_path = train.get("data", {}).get("path") if isinstance(train, Mapping) else None
    manifest = None
    if data_path:
        try:
            manifest = load_manifest(str(data_path))
        except Exception as exc:  # local or s3://: any failure only loses the template
            log.warning("the run's data manifest (%s) cannot be read (%s): the chat template is "
                        "the decoder family's unless --template is given", data_path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    tokenizer = recorded.get("name_or_path") or (manifest.tokenizer.name_or_path
                                                 if manifest else None)
    return RunData(tokenizer=tokenizer, template=manifest.template if manifest else None)


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


def _tokenizer_dir(given: Optional[str], source: CheckpointSource, data: RunData
                   ) -> Optional[Path]:
    """``--tokenizer``, else the imported model's tokenizer, else the run data's; None (with
    one warning line saying what to pass) when none is found."""
    if given:
        return require_tokenizer_dir(given)
    recorded = [(source.provenance.tokenizer, "the imported model's tokenizer"),
                (data.tokenizer, "the tokenizer the run's data was preprocessed with")]
    for folder, what in recorded:
        if is_tokenizer_dir(folder):
            log.info("tokenizer: %s (%s)", folder, what)
            return Path(folder)
    gone = "; ".join(f"{what}, {folder}, no longer exists" for folder, what in recorded if folder)
    log.warning("%s: %s: the export has no processor; pass --tokenizer <HF tokenizer folder> "
                "to include one", source.path, gone or "no tokenizer is recorded")
    return None


def _template(given: Optional[str], data: RunData, arch: str) -> str:
    """``--template``, else the run data's template, else the decoder family's."""
    if given:
        return given
    if data.template in CHAT_TEMPLATES:
        return data.template
    if data.template:
        log.warning("the run's data template %r has no chat template here (%s): using %r",
                    data.template, ", ".join(CHAT_TEMPLATES), default_template(arch))
    return default_template(arch)


def _append_image_row(components: Dict, vocab: int, rows: int) -> None:
    """Grow embeddings and LM head to ``rows`` rows; new rows are the mean row (as transformers'
    ``resize_token_embeddings(mean_resizing=True)``); generation suppresses the token."""
    llm = components["llm"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        table = llm[key]
        extra = table.mean(dim=0, keepdim=True).expand(rows - vocab, -1)
        llm[key] = torch.cat([table, extra], dim=0)


def _export_llava(components, source, out: Path, dtype, tokenizer_dir, template,
                  data: RunData) -> None:
    from transformers import GenerationConfig

    config, arch = source.config, _architecture(source)
    vocab = config.decoder.vocab_size
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, source, data)
    tokenizer = None
    if tokenizer_dir is None:
        image_token_id = vocab  # the id a tokenizer gets for <image> when it fills the vocabulary
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
        build_processor(tokenizer, config, _template(template, data, arch)).save_pretrained(out)


def _export_original(components, source, out: Path, dtype, tokenizer_dir, data: RunData) -> None:
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
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, source, data)
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
    the imported LLM's, else the one the run's data was preprocessed with); ``template``: chat
    template (plain | vicuna_v1 | mistral; default: the run data's, else by decoder family).
    """
    if format not in FORMATS:
        raise ValueError(f"format: {format!r} is not one of {FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    if template is not None and template not in CHAT_TEMPLATES:
        raise ValueError(f"template: {template!r} is not one of {sorted(CHAT_TEMPLATES)}")
    if tokenizer_dir:
        require_tokenizer_dir(tokenizer_dir)  # before the checkpoint is read: fails in a second
    source = resolve_checkpoint(checkpoint_dir)
    data = run_data(source)
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
                _export_llava(components, source, out, DTYPES[dtype], tokenizer_dir, template,
                              data)
            else:
                _export_original(components, source, out, DTYPES[dtype], tokenizer_dir, data)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written export behind
        raise
    log.info("exported %s -> %s (%s, %s)", source.path, out, format, dtype)
    return out
