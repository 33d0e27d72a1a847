"""Checks that need the launch layout, the model config or the dataset manifest.

Run before any process group exists (every rank runs them identically), so a bad launch fails
in seconds with one message naming the field rather than deep inside megatron-core.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict

from pipeline.config import ConfigError, TrainConfig


def check_layout(cfg: TrainConfig, world_size: int) -> int:
    """Validate TP x PP x DP against the world size and the batch sizes; return DP size."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp) != 0:
        raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp}: does not divide the world size "
                          f"{world_size} (WORLD_SIZE from torchrun/srun)")
    dp = world_size // (tp * pp)
    mbs, gbs = cfg.data.micro_batch_size, cfg.data.global_batch_size
    if cfg.data.packing:
        # Packed, a rank's share of the step's samples fills however many micro-batches it
        # needs; only the samples must split evenly over DP.
        if gbs % dp != 0:
            raise ConfigError(f"data.global_batch_size={gbs}: must be divisible by DP = {dp} "
                              "(data.packing=true: it counts samples, split over DP ranks)")
        return dp
    if gbs % (mbs * dp) != 0:
        raise ConfigError(f"data.global_batch_size={gbs}: must be divisible by "
                          f"data.micro_batch_size x DP = {mbs} x {dp} = {mbs * dp}")
    return dp


def check_fp8_available(cfg: TrainConfig) -> None:
    """FP8 GEMMs exist only in Transformer Engine; say so instead of failing in a layer spec."""
    if cfg.precision.fp8 is None:
        return
    if importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(f"precision.fp8={cfg.precision.fp8!r}: FP8 needs Transformer Engine, "
                          "which is not installed (pip install -e .[gpu]); unset precision.fp8")
    if cfg.model.overrides.get("transformer_impl") == "local":
        raise ConfigError("precision.fp8: needs model.overrides.transformer_impl "
                          "'transformer_engine' or 'auto', not 'local'")


def check_model(model_cfg: Any, cfg: TrainConfig) -> None:
    """Model-shape checks (heads/vocab vs TP, layers vs PP) from ``VWLMMConfig.validate``.

    The model's ValueError already names the model field; it is re-raised as ConfigError with
    the trainer field that selected the layout.
    """
    if cfg.data.packing and getattr(model_cfg, "attention_backend", "auto") == "unfused":
        raise ConfigError("data.packing=true: needs attention that keeps packed samples apart "
                          "(model.overrides.attention_backend 'auto' or 'sdpa'); megatron's "
                          "unfused attention has no packed-sequence path")
    try:
        model_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
    except ValueError as exc:
        raise ConfigError(f"model (preset {cfg.model.preset!r}, parallel.tp={cfg.parallel.tp}, "
                          f"parallel.pp={cfg.parallel.pp}, parallel.vpp={cfg.parallel.vpp}): "
                          f"{exc}") from exc


def check_manifest(manifest: Dict[str, Any], model_cfg: Any, cfg: TrainConfig) -> None:
    """Refuse a dataset tokenized or resized differently from what the model and config expect."""
    where = f"{cfg.data.path}/manifest.json"
    tok = manifest.get("tokenizer") or {}
    want_tok = cfg.data.tokenizer
    if want_tok is not None and want_tok not in (tok.get("name_or_path"), tok.get("sha256")):
        raise ConfigError(f"data.tokenizer={want_tok!r}: {where} was tokenized with "
                          f"{tok.get('name_or_path')!r} (sha256 {tok.get('sha256')}); "
                          "re-run preprocessing or fix data.tokenizer")
    if cfg.data.template is not None and manifest.get("template") != cfg.data.template:
        raise ConfigError(f"data.template={cfg.data.template!r}: {where} uses template "
                          f"{manifest.get('template')!r}")
    image_size = manifest.get("image_size")
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0] if len(set(image_size)) == 1 else tuple(image_size)
    if image_size != model_cfg.vision.image_size:
        raise ConfigError(f"model vision.image_size={model_cfg.vision.image_size}: {where} has "
                          f"images of size {manifest.get('image_size')}")
    npatch = manifest.get("num_patches_per_image")
    if npatch is not None and npatch != model_cfg.num_patches:
        raise ConfigError(f"model num_patches={model_cfg.num_patches}: {where} counted "
                          f"{npatch} patches per image (num_tokens would be wrong)")
    vocab = tok.get("vocab_size")
    if vocab is not None and vocab > model_cfg.decoder.vocab_size:
        raise ConfigError(f"model decoder.vocab_size={model_cfg.decoder.vocab_size}: smaller than "
                          f"the dataset tokenizer's vocab_size {vocab} in {where}")
    # max_seq_len is only the preprocessing cap; the longest sample actually stored decides.
    longest = _longest_sample(manifest)
    if longest is not None and longest > model_cfg.decoder.seq_length:
        raise ConfigError(f"model decoder.seq_length={model_cfg.decoder.seq_length}: {where} holds "
                          f"samples of up to {longest} tokens (after image splicing)")
    if manifest.get("image_token_id", model_cfg.image_token_id) != model_cfg.image_token_id:
        raise ConfigError(f"model image_token_id={model_cfg.image_token_id}: {where} uses "
                          f"{manifest.get('image_token_id')}")


def _longest_sample(manifest: Dict[str, Any]):
    stats = manifest.get("statistics") or {}
    for key in ("num_tokens", "tokens", "sequence_length"):
        entry = stats.get(key)
        if isinstance(entry, dict) and "max" in entry:
            return int(entry["max"])
    for key in ("max_tokens", "max_num_tokens"):  # preprocessing writes statistics.max_tokens
        if stats.get(key) is not None:
            return int(stats[key])
    return None


# Fields that fix tensor shapes or the function the weights compute: an initial checkpoint must
# agree on all of them (training flags such as freezing or lambda_vm may differ).
_SHAPE_FIELDS = {
    "decoder": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "rotary_base", "norm_epsilon"),
    "vision": ("image_size", "patch_size", "num_layers", "hidden_size", "ffn_hidden_size",
               "num_attention_heads", "feature_layer", "norm_epsilon"),
}


def check_init_from(model_cfg: Any, cfg: TrainConfig) -> None:
    """``model.init_from`` must hold a model of this run's shape (e.g. the HF import of the
    LLM the preset names); say which fields differ rather than failing inside a load."""
    if not cfg.model.init_from:
        return
    from megatron_vwlmm.convert.errors import IncompleteCheckpointError
    from megatron_vwlmm.convert.megatron_io import resolve_checkpoint

    try:
        source = resolve_checkpoint(cfg.model.init_from)
    except IncompleteCheckpointError as exc:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {exc}") from exc
    differing = [
        f"{group}.{name}: run {getattr(getattr(model_cfg, group), name)!r} vs checkpoint "
        f"{getattr(getattr(source.config, group), name)!r}"
        for group, names in _SHAPE_FIELDS.items() for name in names
        if getattr(getattr(model_cfg, group), name) != getattr(getattr(source.config, group), name)
    ]
    if differing:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from!r} holds a different model than preset "
            f"{cfg.model.preset!r} with its overrides: " + "; ".join(differing)
            + " (set model.preset / model.overrides to match the imported model)")
