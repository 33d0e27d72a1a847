"""The ``model`` section of the trainer config is ``VWLMMConfig`` itself, typed field by field.

The reference for "every field" is the model's own dataclasses (``megatron_vwlmm/model/config.py``),
walked here independently of how ``pipeline/config.py`` generates its section, so a field added
to the model that the trainer config cannot set (or coerce, or list in ``--help``) fails here.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from megatron_vwlmm.model.config import VWLMMConfig, get_preset
from pipeline.config import ConfigError, describe_fields, load_config, train_config_from_dict

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
PRECISION_OWNED = {"bf16", "fp8"}  # set from precision.*, not from the model section


def _model_leaves(cls: type = VWLMMConfig, prefix: str = ""):
    """(dotted key, value in the tiny preset) of every leaf field of the model config."""
    preset = get_preset("tiny")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not prefix and f.name in PRECISION_OWNED:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _model_leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            value = preset
            for part in f"{prefix}{f.name}".split("."):
                value = getattr(value, part)
            yield f"{prefix}{f.name}", value


MODEL_KEYS = [key for key, _ in _model_leaves()]


def test_every_model_field_is_settable_typed_and_listed_by_help():
    """Each field of the tiny preset, written as YAML on top of the 7B preset, parses back to
    exactly that value (type included) and reaches the model: the result is the tiny model.
    Each is documented in --help."""
    sets = [f"model.{key}={yaml.safe_dump(value).strip().removesuffix('...').strip()}"
            for key, value in _model_leaves()]
    cfg = load_config(None, ["model.preset=vicuna-7b", *sets])
    assert cfg.model.vwlmm() == get_preset("tiny")
    for key, value in _model_leaves():
        got = cfg.model
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value and type(got) is type(value), key
    help_text = describe_fields()
    assert [k for k in MODEL_KEYS if f"  model.{k}: " not in help_text] == []
    assert "  model.vision_preset: " in help_text and "model.overrides" not in help_text


def test_set_fields_reach_the_model_with_the_declared_types():
    cfg = load_config(TINY, ["model.decoder.num_layers=2", "model.decoder.rotary_base=5e5",
                             "model.vision.image_size=64", "model.lambda_vm=0.25",
                             "model.freeze_decoder=true", "model.kl_chunk_size=16",
                             "precision.bf16=true"])
    m = cfg.model.vwlmm()
    assert (m.decoder.num_layers, m.vision.image_size, m.kl_chunk_size) == (2, 64, 16)
    assert m.decoder.rotary_base == 5e5 and isinstance(m.decoder.rotary_base, float)
    assert m.lambda_vm == 0.25 and m.freeze_decoder and m.bf16 and m.fp8 is None
    # Fields the run leaves unset keep the preset's values (tiny-cpu.yaml sets seq_length only).
    preset = get_preset("tiny")
    assert m.decoder.seq_length == 64 and m.decoder.hidden_size == preset.decoder.hidden_size
    assert m.vision.patch_size == preset.vision.patch_size


@pytest.mark.parametrize("override, message", [
    ("model.decoder.num_layers=two", "model.decoder.num_layers='two': expected an integer"),
    ("model.decoder.num_layers=2.5", "model.decoder.num_layers=2.5: expected an integer"),
    ("model.freeze_decoder=maybe", "model.freeze_decoder='maybe': expected true/false"),
    ("model.lambda_vm=nan", "model.lambda_vm='nan': expected a finite number"),
    ("model.decoder.num_layers=0", "model.decoder.num_layers: must be positive"),
    ("model.vision.patch_size=0", "model.vision.patch_size: must be positive"),
    ("model.vision.feature_layer=-9", r"model.vision.feature_layer: must be in \[-3, -1\]"),
    ("model.lambda_vm=-1", "model.lambda_vm: must be >= 0"),
    ("model.decoder.layers=2", "model.decoder.layers: unknown key"),
    ("model.preset=llama-70b", "model.preset='llama-70b': must be one of"),
    ("model.vision_preset=vit-h", "model.vision_preset='vit-h': must be one of"),
    ("model.vision=tiny", "model.vision='tiny': the vision encoder preset is model.vision_preset"),
    ("model.overrides.lambda_vm=1", "model.overrides: unknown key; model fields are keys of the "
                                    "model section itself"),
    ("model.bf16=true", "model.bf16: unknown key; the run's precision sets it: use "
                        "precision.bf16"),
])
def test_bad_model_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(TINY, [override])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", ["tiny-cpu", "stage1-vicuna-7b", "stage2-mistral-7b"])
def test_stored_run_config_rebuilds_the_same_run_and_model(name):
    """``to_dict`` (what a checkpoint stores) read back gives the same config and model."""
    cfg = load_config(str(Path(TINY).parent / f"{name}.yaml"), ["model.decoder.num_layers=8"])
    again = train_config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert again.model.vwlmm() == cfg.model.vwlmm()
    assert again.model.vwlmm().decoder.num_layers == 8


def test_print_config_spells_out_the_model_and_reloads_to_it(tmp_path, capsys):
    from pipeline.train import main

    main(["--config", TINY, "--set", "model.decoder.num_layers=2", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    preset = get_preset("tiny")
    assert printed["model"]["decoder"]["num_layers"] == 2
    assert printed["model"]["vision"]["patch_size"] == preset.vision.patch_size  # from the preset
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    again = load_config(str(tmp_path / "printed.yaml"), ["model.preset=mistral-7b"])
    # Every model field is pinned: another preset underneath changes nothing.
    assert again.model.vwlmm() == load_config(TINY, ["model.decoder.num_layers=2"]).model.vwlmm()
