"""Typed training configuration: YAML presets + ``--set key=value`` overrides, validated up front.

Every section is a small dataclass; :func:`load_config` reads a YAML preset, applies dotted
overrides (``--set optim.lr=1e-4``, ``--set model.overrides.decoder.num_layers=4``), coerces
values to the field's declared type and checks what can be checked before any process group
exists. Checks that need the world size (batch divisibility by DP, model shape against TP/PP)
live in :mod:`pipeline.validate` because they run once ``WORLD_SIZE`` is known.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.name``) and why."""


@dataclass
class ModelSection:
    """Which VW-LMM model to build: a ``megatron_vwlmm`` preset plus dotted field overrides.

    ``overrides`` keys are paths into ``VWLMMConfig`` (``decoder.num_layers``, ``lambda_vm``,
    ``freeze_decoder``...) so the trainer never duplicates the model's own config fields.
    """

    preset: str = "tiny"
    vision: Optional[str] = None  # vision preset; None = the decoder preset's default encoder
    overrides: Dict[str, Any] = field(default_factory=dict)
    # A megatron dist checkpoint holding initial weights only (e.g. the HF import of the
    # conversion issue). Ignored when the run resumes from its own checkpoint.
    init_from: Optional[str] = None


@dataclass
class ParallelSection:
    """Model-parallel layout and memory/speed options passed to megatron-core."""

    tp: int = 1
    pp: int = 1
    # Virtual pipeline chunks per stage (interleaved 1F1B); None = plain 1F1B.
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block" (with granularity "full")
    recompute_num_layers: Optional[int] = None
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    backend: Optional[str] = None  # None = nccl on CUDA, gloo otherwise
    timeout_s: int = 600


@dataclass
class PrecisionSection:
    """Numerics: bf16 params/activations on GPU, FP8 GEMMs through Transformer Engine."""

    bf16: bool = False
    fp8: Optional[str] = None  # None | "hybrid" | "e4m3"
    fp8_recipe: str = "delayed"  # megatron-core recipe name: delayed | tensorwise | mxfp8 ...


@dataclass
class DataSection:
    """Where the tokenized shards are and how each data-parallel rank reads them."""

    path: str = ""  # preprocessing output root (holds manifest.json); local path or s3://
    format: str = "auto"  # auto | arrow | webdataset
    # Samples per micro-batch; with packing, packed rows per micro-batch.
    micro_batch_size: int = 1
    # Samples per optimizer step (with or without packing: the step's samples do not depend on
    # the layout, so the data position and the hyper-parameters keep their meaning).
    global_batch_size: int = 8
    # Pack whole samples into rows of seq_length (megatron_vwlmm/model/packing.py) instead of
    # padding each one to seq_length: a step's samples fill as few rows as they can.
    packing: bool = False
    # LLaVA-1.5 stage 2's group_by_modality_length: each step holds only multimodal or only
    # text-only samples, similar lengths per micro-batch (pipeline/data/order.py; Arrow only).
    group_by_modality_length: bool = False
    seed: int = 1234
    num_workers: int = 2
    prefetch_factor: int = 4
    # Fraction of samples held out for validation, chosen by a stable hash of the sample key so
    # the split is the same for both formats and any shard layout.
    valid_fraction: float = 0.0
    pad_token_id: int = 0
    # Expected dataset identity; a manifest that disagrees is refused (None = do not check).
    tokenizer: Optional[str] = None  # manifest tokenizer.name_or_path or tokenizer.sha256
    template: Optional[str] = None
    # S3 access for s3:// paths (credentials come from the usual AWS env/config chain).
    s3_endpoint_url: Optional[str] = None
    s3_region: str = "us-east-1"


@dataclass
class OptimSection:
    """AdamW + warmup/decay schedule (megatron-core OptimizerParamScheduler)."""

    lr: float = 1e-3
    min_lr: float = 0.0
    # Separate peak LR for the adapter / VM head (None = same as lr). LLaVA-style stage-1
    # runs train only those, stage-2 runs often want them at a different LR from the LLM.
    adapter_lr: Optional[float] = None
    vm_head_lr: Optional[float] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 0
    warmup_fraction: Optional[float] = None  # overrides warmup_iters when set
    decay_style: str = "cosine"  # cosine | linear | constant
    decay_iters: Optional[int] = None  # None = train.train_iters
    # per_micro_batch: mean of micro-batch means (LLaVA); per_token: sums over the whole global
    # batch divided by its token counts, independent of packing and split
    # (megatron_vwlmm/model/forward_step.py).
    loss_normalization: str = "per_micro_batch"


@dataclass
class TrainSection:
    """Loop length, evaluation cadence and seeds."""

    train_iters: int = 10
    eval_interval: int = 0  # 0 = never
    eval_iters: int = 1
    seed: int = 1234
    deterministic: bool = True


@dataclass
class CheckpointSection:
    """Megatron dist-checkpointing (torch_dist) saves under ``<run_dir>/checkpoints``."""

    dir: Optional[str] = None  # default <run_dir>/checkpoints
    save_interval: int = 0  # 0 = only at the end and on signals
    keep_last: int = 3
    auto_resume: bool = True
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 (Slurm preemption) -> save and exit


@dataclass
class LoggingSection:
    """Per-step metrics to stdout, JSONL and TensorBoard."""

    log_interval: int = 1
    tensorboard: bool = True
    # Dense peak of one device in TFLOP/s for MFU (H100 SXM bf16: 989). 0 = MFU not reported.
    peak_tflops_per_device: float = 0.0
    # Write the keys of the samples each DP rank trained on to <run_dir>/samples/ (audits, tests).
    record_sample_keys: bool = False


@dataclass
class FaultSection:
    """Failure injection for tests of resume and crash safety (never set in real runs)."""

    kill_after_step: Optional[int] = None  # SIGKILL self right after this step (and its save)
    kill_during_save: Optional[int] = None  # SIGKILL self midway through the save of this step


@dataclass
class TrainConfig:
    """The whole run. ``run_dir`` receives checkpoints, TensorBoard events and metrics.jsonl."""

    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self) -> None:
        check_static(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Static validation (no world size needed)
# --------------------------------------------------------------------------------------------

_CHOICES = {
    "data.format": ("auto", "arrow", "webdataset"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "optim.loss_normalization": ("per_micro_batch", "per_token"),
    "precision.fp8": (None, "hybrid", "e4m3"),
    "parallel.recompute_granularity": (None, "full", "selective"),
    "parallel.recompute_method": (None, "uniform", "block"),
    "parallel.backend": (None, "nccl", "gloo"),
}


def check_static(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first field whose value cannot work in any layout."""
    for path, choices in _CHOICES.items():
        value = _get(cfg, path)
        if value not in choices:
            raise ConfigError(f"{path}={value!r}: must be one of {list(choices)}")
    positive = [
        "parallel.tp", "parallel.pp", "data.micro_batch_size", "data.global_batch_size",
        "train.train_iters", "train.eval_iters", "logging.log_interval", "checkpoint.keep_last",
    ]
    for path in positive:
        if _get(cfg, path) < 1:
            raise ConfigError(f"{path}={_get(cfg, path)}: must be >= 1")
    for path in ["data.num_workers", "checkpoint.save_interval", "train.eval_interval",
                 "optim.warmup_iters", "optim.weight_decay", "optim.clip_grad", "optim.min_lr"]:
        if _get(cfg, path) < 0:
            raise ConfigError(f"{path}={_get(cfg, path)}: must be >= 0")
    if cfg.parallel.vpp is not None and (cfg.parallel.vpp < 2 or cfg.parallel.pp < 2):
        raise ConfigError(
            f"parallel.vpp={cfg.parallel.vpp}: interleaved pipelining needs vpp >= 2 and "
            f"parallel.pp >= 2 (got pp={cfg.parallel.pp}); use vpp: null for plain 1F1B")
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction={cfg.data.valid_fraction}: must be in [0, 1)")
    if cfg.optim.lr <= 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.lr={cfg.optim.lr}, optim.min_lr={cfg.optim.min_lr}: "
                          "need 0 <= min_lr <= lr and lr > 0")
    if cfg.optim.warmup_fraction is not None and not 0 <= cfg.optim.warmup_fraction < 1:
        raise ConfigError(f"optim.warmup_fraction={cfg.optim.warmup_fraction}: must be in [0, 1)")
    decay = cfg.optim.decay_iters or cfg.train.train_iters
    if warmup_iters(cfg) >= max(decay, 1) and cfg.optim.decay_style != "constant":
        raise ConfigError(f"optim.warmup_iters={warmup_iters(cfg)}: must be smaller than the decay "
                          f"length ({decay} iterations)")
    if cfg.precision.fp8 is not None and not cfg.precision.bf16:
        raise ConfigError(f"precision.fp8={cfg.precision.fp8!r}: FP8 training keeps bf16 master "
                          "activations; set precision.bf16=true as well")
    if cfg.parallel.recompute_granularity == "full" and cfg.parallel.recompute_method is None:
        raise ConfigError("parallel.recompute_method: required ('uniform' or 'block') when "
                          "parallel.recompute_granularity='full'")


def warmup_iters(cfg: TrainConfig) -> int:
    if cfg.optim.warmup_fraction is not None:
        return int(cfg.optim.warmup_fraction * (cfg.optim.decay_iters or cfg.train.train_iters))
    return cfg.optim.warmup_iters


# --------------------------------------------------------------------------------------------
# YAML + overrides
# --------------------------------------------------------------------------------------------


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file and ``key=value`` overrides (applied in order).

    A missing or unknown key raises :class:`ConfigError` naming it, so typos never silently fall
    back to defaults.
    """
    raw: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw)}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(TrainConfig, raw, prefix="")


def _set_dotted(raw: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    # model.overrides.<dotted VWLMMConfig path> keeps the rest of the path as one dict key.
    if parts[:2] == ["model", "overrides"] and len(parts) > 2:
        raw.setdefault("model", {}).setdefault("overrides", {})[".".join(parts[2:])] = value
        return
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def from_dict(cls: type, raw: Dict[str, Any], prefix: str) -> Any:
    """Recursively build dataclass ``cls`` from ``raw``, coercing scalars to the declared types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{prefix}{sorted(unknown)[0]}: unknown key (known: {sorted(names)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, prefix=name + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true/false")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r}: expected a number")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return tp(value)
    if tp is str:
        if value is None:
            raise ConfigError(f"{name}: must not be empty")
        return str(value)
    return value


def _get(cfg: Any, path: str) -> Any:
    for p in path.split("."):
        cfg = getattr(cfg, p)
    return cfg


def describe_fields() -> str:
    """Every configurable key with its default, for ``--help``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} = {default!r}")

    walk(TrainConfig, "")
    return "\n".join(lines)
