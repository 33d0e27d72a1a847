"""Typed training configuration: YAML presets + ``--set key=value`` overrides, validated up front.

Every section is a small dataclass; :func:`load_config` reads a YAML preset, applies dotted
overrides (``--set optim.lr=1e-4``, ``--set model.decoder.num_layers=4``), coerces values to the
field's declared type and checks what can be checked before any process group exists. Each
field declares what it accepts next to its default (:func:`setting`: numeric bounds, choices,
whether it is a path), so validation and ``--help`` read the same declaration. Checks that need
the world size (batch divisibility by DP, model shape against TP/PP) live in
:mod:`pipeline.validate` because they run once ``WORLD_SIZE`` is known.

The ``model`` section *is* the run's ``VWLMMConfig`` (``megatron_vwlmm/model/config.py``):
:class:`ModelSection` extends it with the trainer's own keys (``preset``, ``vision_preset``,
``init_from``). :func:`load_config` resolves it once: the preset, then the model fields the run
sets (``--set model.decoder.num_layers=4``), each coerced to the model's declared type, then the
precision flags. A field added to the model is settable, type-checked and listed by ``--help``
without an edit here; ``cfg.model.vwlmm()`` is the plain model config the trainer builds.

Paths (``run_dir``, ``checkpoint.dir``, ``data.path``, ``model.init_from``) have ``~`` expanded,
which the shell does not do inside ``--set key=~/x``. Environment variables are not expanded:
the shell expands them in ``--set``, and a YAML value means what it says.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import yaml

from megatron_vwlmm.model import config as model_config


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.name``) and why."""


# --------------------------------------------------------------------------------------------
# Field declarations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric field accepts; ``None`` leaves that side open-ended."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number_text(self.low), _number_text(self.high)
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"must be {'<' if self.high_open else '<='} {high}"
        return (f"must be in {'(' if self.low_open else '['}{low}, "
                f"{high}{')' if self.high_open else ']'}")


def _number_text(x: Optional[float]) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def setting(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None,
            choices: Optional[Tuple[Any, ...]] = None, path: bool = False) -> Any:
    """A dataclass field with what it accepts: numeric bounds (``ge``/``gt``/``le``/``lt``), a
    tuple of ``choices``, or ``path=True`` for a filesystem path or URL (``~`` expanded)."""
    metadata: Dict[str, Any] = {}
    if (ge, gt, le, lt) != (None,) * 4:
        metadata["bounds"] = Bounds(gt if gt is not None else ge, lt if lt is not None else le,
                                    gt is not None, lt is not None)
    if choices is not None:
        metadata["choices"] = choices
    if path:
        metadata["path"] = True
    return field(default=default, metadata=metadata)


_SEED_MAX = 2**32 - 1  # numpy's legacy seeding (random.seed, np.random.seed) takes uint32
# Whole seconds that datetime.timedelta (the process-group timeout) can hold.
_TIMEOUT_MAX_S = datetime.timedelta.max.days * 86400


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# VWLMMConfig fields that another section owns: the run's precision sets them.
_SET_BY_PRECISION = {"bf16": "precision.bf16", "fp8": "precision.fp8"}


@dataclass(frozen=True)
class ModelSection(model_config.VWLMMConfig):
    """Which VW-LMM model to build: ``preset`` (+ ``vision_preset``) with every
    ``VWLMMConfig`` field on top (``lambda_vm``, ``freeze_decoder``, ``decoder.num_layers``,
    ``vision.image_size``...; one the run leaves out keeps the preset's value). ``bf16`` /
    ``fp8`` come from the precision section."""

    preset: str = setting("tiny", choices=model_config.PRESETS)
    # None = the preset's default encoder (megatron_vwlmm/model/config.py, get_preset).
    vision_preset: Optional[str] = setting(None, choices=(None, *model_config.VISION_PRESETS))
    # A megatron dist checkpoint holding initial weights only (e.g. `vwlmm-convert import`'s
    # output). Ignored when the run resumes from its own checkpoint.
    init_from: Optional[str] = setting(None, path=True)

    def vwlmm(self) -> model_config.VWLMMConfig:
        """The model config alone (what models, checkpoints and exports record)."""
        return model_config.VWLMMConfig(**{f.name: getattr(self, f.name)
                                           for f in dataclasses.fields(model_config.VWLMMConfig)})


_CHOICE_KEYS = tuple(f.name for f in dataclasses.fields(ModelSection)
                     if f.name not in {g.name for g in dataclasses.fields(model_config.VWLMMConfig)})


def _default_model() -> ModelSection:
    return resolve_model({}, PrecisionSection())


@dataclass
class ParallelSection:
    """Model-parallel layout and memory/speed options passed to megatron-core."""

    tp: int = setting(1, ge=1)
    pp: int = setting(1, ge=1)
    # Virtual pipeline chunks per stage (interleaved 1F1B); None = plain 1F1B.
    vpp: Optional[int] = setting(None, ge=2)
    # Split norms, residuals and layer inputs over the TP ranks along the sequence (tp >= 2).
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = setting(None, choices=(None, "full", "selective"))
    # Used with recompute_granularity "full".
    recompute_method: Optional[str] = setting(None, choices=(None, "uniform", "block"))
    recompute_num_layers: Optional[int] = setting(None, ge=1)
    # Recompute a trainable vision tower's layers in backward (model.freeze_vision=false).
    recompute_vision: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    backend: Optional[str] = setting(None, choices=(None, "nccl", "gloo"))  # None: by device
    timeout_s: int = setting(600, ge=1, le=_TIMEOUT_MAX_S)


@dataclass
class PrecisionSection:
    """Numerics: bf16 params/activations on GPU, FP8 GEMMs through Transformer Engine."""

    bf16: bool = False
    fp8: Optional[str] = setting(None, choices=(None, "hybrid", "e4m3"))
    fp8_recipe: str = setting("delayed", choices=model_config.FP8_RECIPES)


@dataclass
class DataSection:
    """Where the tokenized shards are and how each data-parallel rank reads them."""

    # Preprocessing output root (holds manifest.json); local path or s3://.
    path: str = setting("", path=True)
    format: str = setting("auto", choices=("auto", "arrow", "webdataset"))
    # Samples per micro-batch; with packing, packed rows per micro-batch.
    micro_batch_size: int = setting(1, ge=1)
    # Samples per optimizer step (with or without packing: the step's samples do not depend on
    # the layout, so the data position and the hyper-parameters keep their meaning).
    global_batch_size: int = setting(8, ge=1)
    # Pack whole samples into rows of seq_length (megatron_vwlmm/model/packing.py) instead of
    # padding each one to seq_length: a step's samples fill as few rows as they can.
    packing: bool = False
    # LLaVA-1.5 stage 2's group_by_modality_length: each step holds only multimodal or only
    # text-only samples, similar lengths per micro-batch (pipeline/data/order.py; Arrow only).
    group_by_modality_length: bool = False
    seed: int = setting(1234, ge=0, le=_SEED_MAX)
    num_workers: int = setting(2, ge=0)
    prefetch_factor: int = setting(4, ge=1)
    # Fraction of samples held out for validation, chosen by a stable hash of the sample key so
    # the split is the same for both formats and any shard layout.
    valid_fraction: float = setting(0.0, ge=0, lt=1)
    pad_token_id: int = setting(0, ge=0)  # an id of the vocabulary (checked against the model)
    # Expected dataset identity; a manifest that disagrees is refused (None = do not check).
    tokenizer: Optional[str] = None  # manifest tokenizer.name_or_path or tokenizer.sha256
    # A checkpoint records the tokenizer of the data it was trained on; resuming it (or
    # starting from it with model.init_from) on data of another tokenizer is refused unless set.
    allow_tokenizer_change: bool = False
    template: Optional[str] = None
    # S3 access for s3:// paths (credentials come from the usual AWS env/config chain).
    s3_endpoint_url: Optional[str] = None
    s3_region: str = "us-east-1"


@dataclass
class OptimSection:
    """AdamW + warmup/decay schedule (megatron-core OptimizerParamScheduler)."""

    lr: float = setting(1e-3, gt=0)
    min_lr: float = setting(0.0, ge=0)  # at most lr
    # Separate peak LR for the adapter / VM head (None = same as lr). LLaVA-style stage-1
    # runs train only those, stage-2 runs often want them at a different LR from the LLM.
    adapter_lr: Optional[float] = setting(None, gt=0)
    vm_head_lr: Optional[float] = setting(None, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    adam_beta1: float = setting(0.9, ge=0, lt=1)
    adam_beta2: float = setting(0.999, ge=0, lt=1)
    adam_eps: float = setting(1e-8, gt=0)
    clip_grad: float = setting(1.0, ge=0)  # global grad-norm bound; 0 = no clipping
    warmup_iters: int = setting(0, ge=0)
    warmup_fraction: Optional[float] = setting(None, ge=0, lt=1)  # overrides warmup_iters
    decay_style: str = setting("cosine", choices=("cosine", "linear", "constant"))
    decay_iters: Optional[int] = setting(None, ge=1)  # None = train.train_iters
    # per_micro_batch: mean of micro-batch means (LLaVA); per_token: sums over the whole global
    # batch divided by its token counts, independent of packing and split
    # (megatron_vwlmm/model/forward_step.py).
    loss_normalization: str = setting("per_micro_batch",
                                      choices=("per_micro_batch", "per_token"))


@dataclass
class TrainSection:
    """Loop length, evaluation cadence and seeds."""

    train_iters: int = setting(10, ge=1)
    eval_interval: int = setting(0, ge=0)  # 0 = never
    eval_iters: int = setting(1, ge=1)
    seed: int = setting(1234, ge=0, le=_SEED_MAX)
    deterministic: bool = True


@dataclass
class CheckpointSection:
    """Megatron dist-checkpointing (torch_dist) saves under ``<run_dir>/checkpoints``."""

    dir: Optional[str] = setting(None, path=True)  # default <run_dir>/checkpoints
    save_interval: int = setting(0, ge=0)  # 0 = only at the end and on signals
    keep_last: int = setting(3, ge=1)
    auto_resume: bool = True
    # Resume from iter_<N> of the checkpoint folder instead of `latest` (e.g. the newest one
    # is damaged); None = latest.
    resume_iteration: Optional[int] = setting(None, ge=1)
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 (Slurm preemption) -> save and exit


@dataclass
class LoggingSection:
    """Per-step metrics to stdout, JSONL and TensorBoard."""

    log_interval: int = setting(1, ge=1)
    tensorboard: bool = True
    # Dense peak of one device in TFLOP/s for MFU (H100 SXM bf16: 989). 0 = MFU not reported.
    peak_tflops_per_device: float = setting(0.0, ge=0)
    # Write the keys of the samples each DP rank trained on to <run_dir>/samples/ (audits, tests).
    record_sample_keys: bool = False
    # Weights & Biases project to log the same scalars as TensorBoard to (None: no W&B;
    # `pip install wandb`). wandb_mode "offline" writes <run_dir>/wandb without any network.
    wandb_project: Optional[str] = None
    wandb_mode: str = setting("online", choices=("online", "offline", "disabled"))
    # Show every library warning (megatron-core's fallbacks, torch deprecations) instead of a
    # one-line summary of the known ones.
    verbose: bool = False


@dataclass
class TrainConfig:
    """The whole run. ``run_dir`` receives checkpoints, TensorBoard events and metrics.jsonl."""

    run_dir: str = setting("runs/default", path=True)
    model: ModelSection = field(default_factory=lambda: _default_model())
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        for _, section, f, value in _leaves(self):
            if f.metadata.get("path") and isinstance(value, str):
                object.__setattr__(section, f.name, os.path.expanduser(value))
        check_static(self)

    def runtime(self) -> model_config.RuntimeOptions:
        """How this run executes the model (never saved with the weights)."""
        p = self.parallel
        return model_config.RuntimeOptions(
            recompute_granularity=p.recompute_granularity, recompute_method=p.recompute_method,
            recompute_num_layers=p.recompute_num_layers,
            virtual_pipeline_model_parallel_size=p.vpp, sequence_parallel=p.sequence_parallel,
            recompute_vision=p.recompute_vision,
            fp8_recipe=self.precision.fp8_recipe if self.precision.fp8 else None,
            calculate_per_token_loss=self.optim.loss_normalization == "per_token")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    def to_dict(self) -> Dict[str, Any]:
        """Every key of the run, the model's fields spelled out (reloads to the same run)."""
        raw = dataclasses.asdict(self)
        for name in _SET_BY_PRECISION:
            del raw["model"][name]
        return raw


def _leaves(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any, dataclasses.Field, Any]]:
    """(dotted key, owning section, field, value) of every leaf field of ``obj``, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", obj, f, value


# --------------------------------------------------------------------------------------------
# Validation (no world size needed)
# --------------------------------------------------------------------------------------------


def check_static(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first field whose value cannot work in any layout."""
    if not cfg.run_dir:
        raise ConfigError("run_dir: must not be empty (the run's output folder)")
    for key, _, f, value in _leaves(cfg):
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r}: must be one of {list(choices)}"
                              + _did_you_mean(value, choices, lead="; ", ending=""))
        bounds = f.metadata.get("bounds")
        if bounds is not None and value is not None and not bounds.admits(value):
            raise ConfigError(f"{key}={value!r}: {bounds}")
    if cfg.parallel.vpp is not None and cfg.parallel.pp < 2:
        raise ConfigError(
            f"parallel.vpp={cfg.parallel.vpp}: interleaved pipelining needs vpp >= 2 and "
            f"parallel.pp >= 2 (got pp={cfg.parallel.pp}); use vpp: null for plain 1F1B")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr!r}: must be <= optim.lr "
                          f"({cfg.optim.lr!r})")
    decay = cfg.optim.decay_iters or cfg.train.train_iters
    if warmup_iters(cfg) >= decay and cfg.optim.decay_style != "constant":
        raise ConfigError(
            f"optim.warmup_iters={warmup_iters(cfg)}: must be smaller than the decay length "
            f"({decay} iterations); set --set optim.warmup_iters={max(decay - 1, 0)} (or less), "
            f"or raise train.train_iters / optim.decay_iters above {warmup_iters(cfg)}")
    if cfg.precision.fp8 is not None and not cfg.precision.bf16:
        raise ConfigError(f"precision.fp8={cfg.precision.fp8!r}: FP8 training keeps bf16 master "
                          "activations; set precision.bf16=true as well")
    if cfg.parallel.recompute_granularity == "full" and cfg.parallel.recompute_method is None:
        raise ConfigError("parallel.recompute_method: required ('uniform' or 'block') when "
                          "parallel.recompute_granularity='full'")
    endpoint = cfg.data.s3_endpoint_url
    if endpoint is not None and not re.match(r"https?://[^/\s]+", endpoint):
        raise ConfigError(f"data.s3_endpoint_url={endpoint!r}: expected http(s)://host[:port]")
    if cfg.data.pad_token_id >= cfg.model.decoder.vocab_size:
        raise ConfigError(f"data.pad_token_id={cfg.data.pad_token_id}: must be a token id below "
                          f"the model's decoder.vocab_size ({cfg.model.decoder.vocab_size})")


def warmup_iters(cfg: TrainConfig) -> int:
    if cfg.optim.warmup_fraction is not None:
        return int(cfg.optim.warmup_fraction * (cfg.optim.decay_iters or cfg.train.train_iters))
    return cfg.optim.warmup_iters


# --------------------------------------------------------------------------------------------
# The model config of a run
# --------------------------------------------------------------------------------------------


def resolve_model(raw: Mapping[str, Any], precision: PrecisionSection) -> ModelSection:
    """The run's model: ``raw``'s preset, its model fields coerced to the declared types and
    set on top, and the precision flags. Raises :class:`ConfigError` naming the field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model={raw!r}: expected a mapping of model fields")
    hints = typing.get_type_hints(ModelSection)
    choice = {k: _coerce(hints[k], raw[k], f"model.{k}") for k in _CHOICE_KEYS if k in raw}
    for key in ("preset", "vision_preset"):
        choices = dict((f.name, f) for f in dataclasses.fields(ModelSection))[key].metadata[
            "choices"]
        if key in choice and choice[key] not in choices:
            raise ConfigError(f"model.{key}={choice[key]!r}: must be one of {list(choices)}"
                              + _did_you_mean(choice[key], choices, lead="; ", ending=""))
    changes = dict(_model_fields(model_config.VWLMMConfig,
                                 {k: v for k, v in raw.items() if k not in _CHOICE_KEYS}, ""))
    changes.update(bf16=precision.bf16, fp8=precision.fp8)
    preset_name = choice.get("preset", "tiny")
    try:
        preset = model_config.get_preset(preset_name, vision=choice.get("vision_preset"))
        resolved = model_config.replace(preset, **changes)
    except ValueError as exc:
        # The model's errors start with the field they are about ("decoder.num_layers: ...").
        field_name, _, why = str(exc).partition(": ")
        key = _SET_BY_PRECISION.get(field_name, f"model.{field_name}")
        if not why:
            key, why = "model", str(exc)
        raise ConfigError(f"{key}: {why} (preset {preset_name!r})") from exc
    return ModelSection(**{f.name: getattr(resolved, f.name)
                           for f in dataclasses.fields(model_config.VWLMMConfig)}, **choice)


def _model_fields(cls: type, raw: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    """(dotted field name, coerced value) of every model field in ``raw`` (a sub-mapping of
    the ``model`` section), checked against the model dataclass ``cls``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model.{prefix.rstrip('.')}={raw!r}: expected a mapping of "
                          f"{cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        dotted = f"model.{prefix}{key}"
        if key not in names or (not prefix and key in _SET_BY_PRECISION):
            known = sorted(set(names + list(_CHOICE_KEYS * (not prefix)))
                           - set(_SET_BY_PRECISION))
            hint = _ELSEWHERE.get(dotted, _did_you_mean(key, known, f"model.{prefix}")
                                  + "known: " + ", ".join(known))
            raise ConfigError(f"{dotted}: unknown key; {hint}")
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, str) and dotted == "model.vision":
                raise ConfigError(f"model.vision={value!r}: the vision encoder preset is "
                                  "model.vision_preset; model.vision holds VisionConfig fields")
            yield from _model_fields(hints[key], value or {}, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", _coerce(hints[key], value, dotted)


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
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw)}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML ({_yaml_problem(exc)})") \
                from None
        _set_dotted(raw, key.strip(), parsed)
    return train_config_from_dict(raw)


def train_config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from its :meth:`TrainConfig.to_dict` form (a YAML file, the run
    config stored in a checkpoint), coerced and validated; raises :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"<root>={raw!r}: expected a mapping of TrainConfig fields")
    sections = dict(raw)
    model_raw = sections.pop("model", None) or {}
    precision = from_dict(PrecisionSection, sections.get("precision") or {}, "precision.")
    sections["model"] = resolve_model(model_raw, precision)
    return from_dict(TrainConfig, sections, prefix="")


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def _set_dotted(raw: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


# Keys that are not fields of their section but name a value that lives elsewhere.
_ELSEWHERE = {
    "model.overrides": "model fields are keys of the model section itself, e.g. "
                       "model.decoder.num_layers or model.lambda_vm",
    **{f"model.{name}": f"the run's precision sets it: use {key}"
       for name, key in _SET_BY_PRECISION.items()},
}


def _did_you_mean(word: Any, candidates, prefix: str = "", lead: str = "",
                  ending: str = " ") -> str:
    """``"did you mean <prefix>x? "`` for the closest candidate, or nothing."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [c for c in candidates if isinstance(c, str)], n=1)
    return f"{lead}did you mean {prefix}{close[0]}?{ending}" if close else ""


def from_dict(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """Recursively build dataclass ``cls`` from ``raw``, coercing scalars to the declared types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}={raw!r}: expected a mapping of "
                          f"{cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            hint = _ELSEWHERE.get(f"{prefix}{key}", _did_you_mean(key, names, prefix)
                                  + f"known: {', '.join(sorted(names))}")
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if isinstance(value, ModelSection):
        return value  # resolved by resolve_model
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, prefix=name + ".")
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true/false")
        return value
    if tp is int:
        return _to_int(value, name)
    if tp is float:
        return _to_float(value, name)
    if tp is str:
        if value is None:
            raise ConfigError(f"{name}: must not be empty")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"{name}: config fields of type {tp!r} are not supported")


_INT64_MAX = 2**63 - 1


def _number(value: Any, name: str, kind: str) -> Any:
    """``value`` as an int or float (YAML 1.1 reads ``3e-3``, ``inf`` and ``nan`` as strings)."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: expected {kind}")
    return value


def _to_int(value: Any, name: str) -> int:
    number = _number(value, name, "an integer")
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ConfigError(f"{name}={value!r}: expected a finite integer")
        if not number.is_integer():
            raise ConfigError(f"{name}={value!r}: expected an integer")
        number = int(number)
    if abs(number) > _INT64_MAX:
        raise ConfigError(f"{name}={value!r}: out of range (a 64-bit integer)")
    return number


def _to_float(value: Any, name: str) -> float:
    number = _number(value, name, "a number")
    try:
        number = float(number)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    return number


def _get(cfg: Any, path: str) -> Any:
    for p in path.split("."):
        cfg = getattr(cfg, p)
    return cfg


# --------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------


def describe_fields() -> str:
    """Every configurable key with its type and default (or what it accepts), for ``--help``."""
    lines = []
    # The model section's own keys (preset, vision_preset, init_from) before its fields.
    leaves = list(_leaves(TrainConfig()))
    choices = [leaf for leaf in leaves if leaf[0] in {f"model.{k}" for k in _CHOICE_KEYS}]
    rest = [leaf for leaf in leaves if leaf not in choices]
    first_model = next(i for i, leaf in enumerate(rest) if leaf[0].startswith("model."))
    for key, section, f, default in rest[:first_model] + choices + rest[first_model:]:
        declared = typing.get_type_hints(type(section))[f.name]
        if key.startswith("model.") and key.removeprefix("model.") in _SET_BY_PRECISION:
            continue
        if key.startswith("model.") and key.removeprefix("model.") not in _CHOICE_KEYS:
            line = f"  {key}: {_type_name(declared)} = <preset>"
        else:
            line = f"  {key}: {_type_name(declared)} = {default!r}"
        if "choices" in f.metadata:
            line += f"  (one of {', '.join(repr(c) for c in f.metadata['choices'])})"
        if "bounds" in f.metadata:
            line += f"  ({f.metadata['bounds']})"
        if f.metadata.get("path"):
            line += "  (path; ~ expanded)"
        lines.append(line)
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} | None"
    return getattr(tp, "__name__", str(tp))
