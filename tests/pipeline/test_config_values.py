"""Hostile ``--set`` values: every one is a one-line ConfigError naming the key and the value
(exit code 2 from the CLI, no traceback), every numeric field has a range, paths expand ``~``."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.train import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")


@pytest.mark.parametrize("override, message", [
    # Non-finite or non-integral numbers where an integer is declared.
    ("train.train_iters=inf", "train.train_iters='inf': expected a finite integer"),
    ("train.train_iters=nan", "train.train_iters='nan': expected a finite integer"),
    ("train.train_iters=.inf", "train.train_iters=inf: expected a finite integer"),
    ("data.num_workers=1e400", "data.num_workers='1e400': expected a finite integer"),
    ("train.train_iters=2.5", "train.train_iters=2.5: expected an integer"),
    ("train.train_iters=1e30", "train.train_iters='1e30': out of range"),
    ("train.seed=99999999999999999999999", "train.seed=99999999999999999999999: out of range"),
    # Non-finite floats.
    ("optim.lr=nan", "optim.lr='nan': expected a finite number"),
    ("optim.lr=inf", "optim.lr='inf': expected a finite number"),
    ("optim.lr=-.inf", "optim.lr=-inf: expected a finite number"),
    ("optim.clip_grad=nan", "optim.clip_grad='nan': expected a finite number"),
    ("optim.weight_decay=1e400", "optim.weight_decay='1e400': expected a finite number"),
    # Out of range.
    ("optim.adam_beta1=5", r"optim.adam_beta1=5.0: must be in \[0, 1\)"),
    ("optim.adam_beta2=1", r"optim.adam_beta2=1.0: must be in \[0, 1\)"),
    ("optim.adam_eps=0", "optim.adam_eps=0.0: must be > 0"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("optim.adapter_lr=-1e-4", "optim.adapter_lr=-0.0001: must be > 0"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0: must be >= 0"),
    ("optim.decay_iters=0", "optim.decay_iters=0: must be >= 1"),
    ("parallel.timeout_s=-1", r"parallel.timeout_s=-1: must be in \[1, "),
    ("parallel.timeout_s=100000000000000", r"parallel.timeout_s=100000000000000: must be in"),
    ("parallel.recompute_num_layers=0", "parallel.recompute_num_layers=0: must be >= 1"),
    ("data.valid_fraction=1", r"data.valid_fraction=1.0: must be in \[0, 1\)"),
    ("data.prefetch_factor=0", "data.prefetch_factor=0: must be >= 1"),
    ("data.seed=-3", r"data.seed=-3: must be in \[0, 4294967295\]"),
    ("data.pad_token_id=32000", "data.pad_token_id=32000: must be a token id below the model's "
                                r"decoder.vocab_size \(32000\)"),
    ("logging.peak_tflops_per_device=-989", "logging.peak_tflops_per_device=-989.0: must be >= 0"),
    ("precision.fp8_recipe=fast", "precision.fp8_recipe='fast': must be one of"),
    ("run_dir=''", "run_dir: must not be empty"),
    ("data.s3_endpoint_url=localhost:9000", "data.s3_endpoint_url='localhost:9000': expected "
                                            r"http\(s\)://host\[:port\]"),
    # Malformed input.
    ("data.path=[oops", r"--set data.path=\[oops: value is not valid YAML"),
    ("data.path={a: 1}", r"data.path=\{'a': 1\}: expected a string"),
])
def test_bad_values_are_one_line_errors_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(TINY, [override])
    assert "\n" not in str(raised.value)


def _numeric_keys(cls: type = TrainConfig, prefix: str = ""):
    """Every int/float field outside the model section (whose ranges the model config checks)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if f.name != "model":
                yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif {int, float} & {tp, *typing.get_args(tp)}:
            yield f"{prefix}{f.name}"


NUMERIC_KEYS = list(_numeric_keys())


def test_every_numeric_field_has_a_range_and_rejects_non_finite():
    """No numeric knob of the trainer takes a negative value or NaN; a new field must declare
    its range to pass."""
    assert "optim.lr" in NUMERIC_KEYS and "parallel.timeout_s" in NUMERIC_KEYS
    accepted = []
    for key in NUMERIC_KEYS:
        for bad in ("-1", "nan"):
            try:
                load_config(TINY, [f"{key}={bad}"])
                accepted.append(f"{key}={bad}")
            except ConfigError as exc:
                assert str(exc).startswith(f"{key}="), str(exc)
    assert accepted == []


@pytest.mark.parametrize("override, value", [
    ("train.train_iters=1e3", 1000),  # YAML 1.1 reads 1e3 as a string; still an integer
    ("train.train_iters=1000.0", 1000),
    ("optim.lr=3e-3", 3e-3),
    ("optim.adam_beta1=0", 0.0),
    ("optim.clip_grad=0", 0.0),  # no clipping
    ("data.valid_fraction=0.5", 0.5),
])
def test_edge_values_inside_the_range_are_accepted(override, value):
    key = override.split("=")[0]
    got = load_config(TINY, [override])
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override", ["train.train_iters=inf", "optim.adam_beta1=5",
                                      "data.num_workers=1e400", "parallel.timeout_s=-1"])
def test_cli_prints_the_error_without_traceback_and_exits_2(override, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--config", TINY, "--set", override, "--print-config"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {override.split('=')[0]}=") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_reports_a_missing_or_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    for path, message in ((tmp_path / "missing.yaml", "No such file or directory"),
                          (bad, "not valid YAML")):
        with pytest.raises(SystemExit) as raised:
            main(["--config", str(path), "--print-config"])
        err = capsys.readouterr().err
        assert raised.value.code == 2 and message in err and err.count("\n") == 1, err


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    """``--set checkpoint.dir=~/ck`` (the shell leaves ``~`` alone after ``key=``) and ``~`` in
    YAML mean the home folder; ``$VARS`` and URLs are taken literally."""
    monkeypatch.setenv("HOME", str(tmp_path))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("run_dir: ~/runs/a\ndata:\n  path: ~/data\n")
    cfg = load_config(str(yaml_file), ["checkpoint.dir=~/ck", "model.init_from=~/import",
                                       "data.tokenizer=~/not-a-path"])
    assert cfg.run_dir == f"{tmp_path}/runs/a" and cfg.data.path == f"{tmp_path}/data"
    assert cfg.checkpoint_dir == tmp_path / "ck" and cfg.model.init_from == f"{tmp_path}/import"
    assert cfg.data.tokenizer == "~/not-a-path"  # an identity compared with the manifest
    cfg = load_config(None, ["run_dir=$HOME/r", "data.path=s3://bucket/~x"])
    assert cfg.run_dir == "$HOME/r" and cfg.data.path == "s3://bucket/~x"
    assert cfg.checkpoint_dir == Path("$HOME/r/checkpoints")
