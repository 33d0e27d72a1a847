"""What a checkpoint records besides its tensors: the resolved model config and the
provenance of its weights.

Both sit in megatron's common state (``common.pt``) of every checkpoint vwlmm writes, imports
(``convert/megatron_io.py``) and trainer saves (``pipeline/checkpoint.py``) alike, so an export
rebuilds the exact model and finds the HF source, tokenizer and vision tail with no trainer
code. The provenance of an import is carried unchanged through every save of a run that starts
from it (``model.init_from``) and through every resume.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from megatron_vwlmm.checkpoint.layout import VISION_TAIL_FILE

CONFIG_KEY = "vwlmm_config"
PROVENANCE_KEY = "provenance"
# The data tokenizer a trainer checkpoint's weights were trained on (the manifest's
# ``TokenizerInfo`` as a dict: name_or_path, sha256, vocab_size); a resume compares it.
TOKENIZER_KEY = "data_tokenizer"
# The run's TrainConfig as a dict (pipeline/config.py), in a trainer checkpoint's common state.
TRAIN_CONFIG_KEY = "config"


# -- VWLMMConfig <-> plain dict ---------------------------------------------------------------

def config_to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls, raw: Mapping[str, Any]):
    """``cls(**raw)`` with nested dataclass fields built from their sub-dicts (TypeError for
    an unknown or missing field)."""
    hints = typing.get_type_hints(cls)
    values = dict(raw)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(values.get(f.name), Mapping):
            values[f.name] = _build(hints[f.name], values[f.name])
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any], source: str = "config"):
    """Inverse of ``config_to_dict``; an unknown, missing or invalid field is named in the
    error. Fields added to the config after the dict was written take their defaults."""
    from megatron_vwlmm.model.config import VWLMMConfig

    try:
        if not isinstance(raw, Mapping):
            raise TypeError(f"a {type(raw).__name__}, not a mapping")
        return _build(VWLMMConfig, raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: not a VWLMMConfig ({exc})") from exc


def model_config_of(common: Mapping[str, Any], where: str):
    """The ``VWLMMConfig`` a checkpoint's common state records."""
    if CONFIG_KEY not in common:
        raise ValueError(f"{where} records no model config ('{CONFIG_KEY}'): it was not written "
                         "by `vwlmm-convert import` or `pipeline.train`")
    return config_from_dict(common[CONFIG_KEY], where)


# -- provenance -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint's weights came from. Empty for a model trained from scratch.

    ``import_dir``: the ``vwlmm-convert import`` folder the weights descend from.
    ``conversion``: that import's record of its source (``importer.py``: HF folders, their
    configs, the decoder family), which exports reuse for config fields the megatron config
    does not hold. ``tokenizer``: the HF tokenizer folder of the source model.
    ``vision_tail``: the file the import wrote the unrun vision layers to; every trainer
    checkpoint carries its own copy (``layout.VISION_TAIL_FILE``), so the export does not need
    the import folder to still exist.
    """

    import_dir: Optional[str] = None
    conversion: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    vision_tail: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def of(common: Mapping[str, Any], where: str) -> "Provenance":
        """The provenance a checkpoint's common state records (empty when it records none: a
        model trained from scratch)."""
        raw = common.get(PROVENANCE_KEY)
        if raw is None:
            return Provenance()
        try:
            return _build(Provenance, raw)
        except TypeError as exc:
            raise ValueError(f"{where}: '{PROVENANCE_KEY}' is not a Provenance ({exc})") from exc

    def vision_tail_file(self, checkpoint: Path) -> Optional[Path]:
        """The vision tail for ``checkpoint``: its own copy, else the import's file; None
        when the weights never had one (trained from scratch, or an encoder run to its last
        layer)."""
        for candidate in (Path(checkpoint) / VISION_TAIL_FILE,
                          Path(self.vision_tail) if self.vision_tail else None):
            if candidate is not None and candidate.is_file():
                return candidate
        if self.vision_tail:
            raise FileNotFoundError(
                f"{checkpoint}: its weights come from {self.import_dir}, whose vision tail "
                f"({self.vision_tail}) is neither in the checkpoint ({VISION_TAIL_FILE}) nor at "
                "that path any more; restore one of them to export the whole vision tower")
        return None
