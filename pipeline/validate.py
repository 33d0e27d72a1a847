"""Checks that need the launch layout, the model config or the dataset manifest.

Run before any process group exists (every rank runs them identically), so a bad launch fails
in seconds with one message naming the field rather than deep inside megatron-core.
"""

from __future__ import annotations

import importlib.util
from typing import Any, List, Mapping, Optional

from pipeline.config import ConfigError, TrainConfig
from vwlmm_data import contract
from vwlmm_data.contract import Manifest, ShardInfo, VisionInfo
from vwlmm_data.storage import S3Options


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
    if cfg.model.transformer_impl == "local":
        raise ConfigError("precision.fp8: needs model.transformer_impl "
                          "'transformer_engine' or 'auto', not 'local'")


def check_model(model_cfg: Any, cfg: TrainConfig) -> None:
    """Model-shape checks (heads/vocab vs TP, layers vs PP) from ``VWLMMConfig.validate``.

    The model's ValueError already names the model field; it is re-raised as ConfigError with
    the trainer field that selected the layout.
    """
    if cfg.data.packing and getattr(model_cfg, "attention_backend", "auto") == "unfused":
        raise ConfigError("data.packing=true: needs attention that keeps packed samples apart "
                          "(model.attention_backend 'auto' or 'sdpa'); megatron's "
                          "unfused attention has no packed-sequence path")
    if cfg.parallel.sequence_parallel:
        tp, seq = cfg.parallel.tp, model_cfg.decoder.seq_length
        if tp < 2:
            raise ConfigError(f"parallel.sequence_parallel=true: splits the sequence over the "
                              f"tensor-parallel ranks, so it needs parallel.tp >= 2 (got {tp})")
        if seq % tp != 0:
            raise ConfigError(f"parallel.sequence_parallel=true: model.decoder.seq_length={seq} "
                              f"is not divisible by parallel.tp={tp} (each TP rank keeps "
                              f"seq_length / tp positions)")
    try:
        model_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
    except ValueError as exc:
        raise ConfigError(f"model (preset {cfg.model.preset!r}, parallel.tp={cfg.parallel.tp}, "
                          f"parallel.pp={cfg.parallel.pp}, parallel.vpp={cfg.parallel.vpp}): "
                          f"{exc}") from exc


def load_manifest(root: str, s3: S3Options) -> Manifest:
    """The dataset manifest under ``data.path``; a missing or malformed one is a ConfigError."""
    try:
        return contract.load_manifest(root, s3)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.path={root!r}: no manifest.json there ({exc}); point data.path "
                          "at the preprocessing output folder") from exc
    except ValueError as exc:
        raise ConfigError(f"data.path={root!r}: {exc}") from exc


def select_shards(manifest: Manifest, root: str, fmt: str) -> List[ShardInfo]:
    """The shards of ``data.format`` (``auto`` prefers Arrow), resolved against ``root``."""
    try:
        fmt = manifest.select_format(fmt)
    except ValueError as exc:
        raise ConfigError(f"data.format={fmt!r}: {root}/manifest.json: {exc}") from exc
    return [s.resolve(root) for s in manifest.shards_of(fmt)]


def check_manifest(manifest: Manifest, model_cfg: Any, cfg: TrainConfig) -> None:
    """Refuse a dataset tokenized or prepared differently from what the model and config expect."""
    where = f"{cfg.data.path}/manifest.json"
    tok = manifest.tokenizer
    want_tok = cfg.data.tokenizer
    if want_tok is not None and want_tok not in (tok.name_or_path, tok.sha256):
        raise ConfigError(f"data.tokenizer={want_tok!r}: {where} was tokenized with "
                          f"{tok.name_or_path!r} (sha256 {tok.sha256}); "
                          "re-run preprocessing or fix data.tokenizer")
    if cfg.data.template is not None and manifest.template != cfg.data.template:
        raise ConfigError(f"data.template={cfg.data.template!r}: {where} uses template "
                          f"{manifest.template!r}")
    if manifest.image_size != model_cfg.vision.image_size:
        raise ConfigError(f"model vision.image_size={model_cfg.vision.image_size}: {where} has "
                          f"images of size {manifest.image_size}; preprocess for this model with "
                          f"vwlmm-preprocess ... --image-size {model_cfg.vision.image_size} "
                          f"--patch-size {model_cfg.vision.patch_size}, or set "
                          f"model.vision.image_size={manifest.image_size}")
    want_vision = VisionInfo.of(model_cfg.vision.kind)
    got = manifest.vision
    if (got.encoder, got.image_mean, got.image_std) != \
            (want_vision.encoder, want_vision.image_mean, want_vision.image_std):
        raise ConfigError(f"model vision.kind={model_cfg.vision.kind!r}: {where} holds images "
                          f"prepared for {got.encoder!r} (mean {got.image_mean}, std "
                          f"{got.image_std}); re-run preprocessing with --vision-encoder "
                          f"{model_cfg.vision.kind}")
    if manifest.num_patches_per_image != model_cfg.num_patches:
        raise ConfigError(f"model num_patches={model_cfg.num_patches}: {where} counted "
                          f"{manifest.num_patches_per_image} patches per image (num_tokens would "
                          "be wrong); preprocess with vwlmm-preprocess ... --patch-size "
                          f"{model_cfg.vision.patch_size}")
    if tok.vocab_size > model_cfg.decoder.vocab_size:
        raise ConfigError(f"model decoder.vocab_size={model_cfg.decoder.vocab_size}: smaller than "
                          f"the dataset tokenizer's vocab_size {tok.vocab_size} in {where}")
    # max_seq_len is only the preprocessing cap; the longest sample actually stored decides.
    longest = manifest.statistics.max_tokens
    if longest > model_cfg.decoder.seq_length:
        raise ConfigError(f"model decoder.seq_length={model_cfg.decoder.seq_length}: {where} holds "
                          f"samples of up to {longest} tokens (after image splicing); set "
                          f"model.decoder.seq_length={longest} or more, or preprocess with "
                          f"vwlmm-preprocess ... --max-seq-len {model_cfg.decoder.seq_length} "
                          "--overlong truncate")
    if manifest.image_token_id != model_cfg.image_token_id:
        raise ConfigError(f"model image_token_id={model_cfg.image_token_id}: {where} uses "
                          f"{manifest.image_token_id}")


# Fields that fix tensor shapes or the function the weights compute: an initial checkpoint must
# agree on all of them (training flags such as freezing or lambda_vm may differ).
_SHAPE_FIELDS = {
    "decoder": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "rotary_base", "norm_epsilon"),
    "vision": ("kind", "image_size", "patch_size", "num_layers", "hidden_size", "ffn_hidden_size",
               "num_attention_heads", "feature_layer", "norm_epsilon"),
}


def _shape_differences(run: Any, saved: Any) -> List[str]:
    return [
        f"{group}.{name}: run {getattr(getattr(run, group), name)!r} vs checkpoint "
        f"{getattr(getattr(saved, group), name)!r}"
        for group, names in _SHAPE_FIELDS.items() for name in names
        if getattr(getattr(run, group), name) != getattr(getattr(saved, group), name)]


def _check_tokenizer(common: Mapping[str, Any], manifest: Manifest, where: str,
                     cfg: TrainConfig) -> None:
    """The data's tokenizer must be the one the checkpoint's weights were trained on."""
    from megatron_vwlmm.checkpoint.metadata import TOKENIZER_KEY

    saved = common.get(TOKENIZER_KEY)
    tok = manifest.tokenizer
    if not saved or cfg.data.allow_tokenizer_change or saved.get("sha256") == tok.sha256:
        return
    raise ConfigError(
        f"{where} was trained on data of tokenizer {saved.get('name_or_path')!r} (sha256 "
        f"{saved.get('sha256')}), but {cfg.data.path}/manifest.json was tokenized with "
        f"{tok.name_or_path!r} (sha256 {tok.sha256}): the same ids would mean other words. "
        "Preprocess the data with the checkpoint's tokenizer, or add --set "
        "data.allow_tokenizer_change=true if the change is deliberate")


def check_init_from(model_cfg: Any, cfg: TrainConfig, manifest: Optional[Manifest] = None) \
        -> None:
    """``model.init_from`` must hold a model of this run's shape (e.g. the HF import of the
    LLM the preset names), trained (if by vwlmm) on the data's tokenizer; say which fields
    differ rather than failing inside a load."""
    if not cfg.model.init_from:
        return
    from megatron_vwlmm.convert.errors import IncompleteCheckpointError
    from megatron_vwlmm.convert.megatron_io import resolve_checkpoint

    try:
        source = resolve_checkpoint(cfg.model.init_from)
    except IncompleteCheckpointError as exc:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {exc}") from exc
    differing = _shape_differences(model_cfg, source.config)
    if differing:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from!r} holds a different model than preset "
            f"{cfg.model.preset!r} with the run's model fields: " + "; ".join(differing)
            + " (set model.preset / model.decoder.* / model.vision.* to match the imported model)")
    if manifest is not None:
        _check_tokenizer(source.common, manifest, f"model.init_from={cfg.model.init_from!r}",
                         cfg)


def check_resume(cfg: TrainConfig, model_cfg: Any, manifest: Manifest) -> None:
    """The checkpoint a run would resume from holds the run's model, trained on the data's
    tokenizer, and is loadable: one line naming what differs, before megatron loads anything.
    (Reads only; the trainer repeats the choice after finishing a killed save.)"""
    from megatron_vwlmm.checkpoint.layout import previous_checkpoint_hint
    from megatron_vwlmm.checkpoint.metadata import TRAIN_CONFIG_KEY, model_config_of
    from megatron_vwlmm.checkpoint.safe_read import CheckpointError, require_loadable

    from pipeline.checkpoint import plan_resume

    root, c = cfg.checkpoint_dir, cfg.checkpoint
    try:
        path = plan_resume(root, c.auto_resume, c.resume_iteration)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint.dir={root}: {exc}") from None
    except ConfigError:
        return  # a state that `layout.recover` may settle (a first save killed before
        # writing `latest`): the trainer decides after recovering, and names what is wrong
    if path is None:
        return  # a new run
    try:
        common = require_loadable(path)
        saved = model_config_of(common, f"{path}/common.pt")
    except (CheckpointError, ValueError) as exc:
        raise ConfigError(f"{exc}; {previous_checkpoint_hint(path)}") from None
    differing = _shape_differences(model_cfg, saved)
    if differing:
        raise ConfigError(
            f"{path} holds another model than this run's (preset {cfg.model.preset!r} and "
            "its model fields): " + "; ".join(differing) + ". Resume it with the model it was "
            "trained with, or start a new run with another run_dir or checkpoint.dir")
    saved_distopt = ((common.get(TRAIN_CONFIG_KEY) or {}).get("parallel") or {}).get(
        "use_distributed_optimizer")
    if saved_distopt is not None and saved_distopt != cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            f"parallel.use_distributed_optimizer={cfg.parallel.use_distributed_optimizer}: "
            f"{path} holds the optimizer state of use_distributed_optimizer={saved_distopt}, "
            "which megatron cannot load into the other optimizer; resume with "
            f"--set parallel.use_distributed_optimizer={str(saved_distopt).lower()}")
    _check_tokenizer(common, manifest, str(path), cfg)
