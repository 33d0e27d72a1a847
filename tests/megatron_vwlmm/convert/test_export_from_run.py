"""A run trained from scratch exports with its data's tokenizer and template, no flags needed.

The data: the real 32000-piece Mistral tokenizer (``vwlmm-preprocess build-tokenizer``), caption
samples tokenized by preprocessing's own ``plain`` template code, stored in the data contract
with the tokenizer folder in the manifest. One spawned process trains the tiny preset on it
(``pipeline.train.run``, one step), runs ``vwlmm-convert export`` of the run folder without
``--tokenizer``, then once more with that tokenizer folder moved away. The checks read the
results with stock transformers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.pipeline.launch import REPO

pytestmark = pytest.mark.timeout(600)

VOCAB = 32000
NUM_PATCHES = 16  # tiny preset: 32 px images, 8 px patches
CAPTIONS = ["a red square", "a green field", "a blue sky", "a grey wall"]
RUN_SETS = ["parallel.tp=1", "logging.tensorboard=false", "train.eval_interval=0",
            "data.valid_fraction=0", "data.num_workers=0", "data.format=arrow",
            "data.micro_batch_size=2", "data.global_batch_size=2", "train.train_iters=1",
            "optim.warmup_iters=0", "checkpoint.save_interval=1"]


def _write_data(root: Path, tokenizer: Path) -> None:
    from preprocessing.legacy_tokenizer import load_text_tokenizer
    from preprocessing.templates import Turn, tokenize
    from pipeline.data.synthetic import make_samples, write_dataset

    text = load_text_tokenizer(str(tokenizer), "auto")
    samples = make_samples(len(CAPTIONS), seed=3)
    for sample, caption in zip(samples, CAPTIONS):
        tok = tokenize("plain", [Turn("human", "<image>"), Turn("gpt", caption)], text)
        sample.update(input_ids=tok.input_ids, labels=tok.labels)
    write_dataset(str(root / "data"), samples, shard_size=len(samples), formats=("arrow",),
                  tokenizer=str(tokenizer), template="plain", max_seq_len=64, vocab_size=VOCAB)


def _train_and_export(root: str) -> dict:
    from megatron_vwlmm.convert import cli
    from megatron_vwlmm.parallel.launch import find_free_port
    from pipeline.config import load_config
    from pipeline.train import run as train_run

    root = Path(root)
    os.environ["MASTER_PORT"] = str(find_free_port())
    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"),
                      RUN_SETS + [f"data.path={root / 'data'}", f"run_dir={root / 'run'}"])
    out = {"iteration": train_run(cfg)["state"].iteration}
    out["rc"] = cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "hf")])

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_vwlmm.convert.exporter").addHandler(handler)
    (root / "tokenizer").rename(root / "tokenizer.moved")
    try:
        out["rc_gone"] = cli.main(["export", "--checkpoint", str(root / "run"),
                                   "--out", str(root / "hf_no_tokenizer")])
    finally:
        (root / "tokenizer.moved").rename(root / "tokenizer")
    out["warnings_gone"] = warnings
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    root = tmp_path_factory.mktemp("export_from_run")
    _write_data(root, build_mistral_hf_tokenizer(root / "tokenizer"))
    result = run_on_ranks(_train_and_export, 1, args=(str(root),), timeout_s=540)[0]
    assert result["iteration"] == 1
    return root, result


def _first_training_sample(root: Path):
    from vwlmm_data.contract import load_manifest

    shard = load_manifest(str(root / "data")).shards_of("arrow")[0]
    with pa.OSFile(str(root / "data" / shard.path)) as f:
        table = pa.ipc.open_file(f).read_all()
    return table["input_ids"][0].as_py(), table["labels"][0].as_py()


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 24), (200, 30, 60))


def test_export_takes_the_tokenizer_and_template_of_the_run_data(exported):
    from transformers import AutoProcessor, AutoTokenizer

    from megatron_vwlmm.convert.processor import CHAT_TEMPLATES

    root, r = exported
    assert r["rc"] == 0
    processor = AutoProcessor.from_pretrained(root / "hf")
    assert processor.chat_template == CHAT_TEMPLATES["plain"]
    want = AutoTokenizer.from_pretrained(root / "tokenizer").get_vocab()
    want["<image>"] = VOCAB
    assert processor.tokenizer.get_vocab() == want


def test_documented_prompt_reproduces_training_and_generates(exported):
    """Stock AutoProcessor + LlavaForConditionalGeneration with the plain template's prompt
    "<image>": BOS and the image's patch tokens, as the training sample before its caption."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, _ = exported
    ids, labels = _first_training_sample(root)
    caption_start = next(i for i, label in enumerate(labels) if label != -100)
    assert ids[:caption_start] == [1, -200]  # preprocessing's plain: BOS, <image>, caption
    processor = AutoProcessor.from_pretrained(root / "hf")
    inputs = processor(images=_image(), text="<image>", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [1] + [VOCAB] * NUM_PATCHES
    model = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:].tolist()
    assert 1 <= len(new) <= 4 and VOCAB not in new
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_recorded_tokenizer_gone_is_one_line(exported):
    root, r = exported
    assert r["rc_gone"] == 0  # the weights are still exported
    about_tokenizer = [w for w in r["warnings_gone"] if "tokenizer" in w]
    assert len(about_tokenizer) == 1
    line = about_tokenizer[0]
    assert "\n" not in line and str(root / "tokenizer") in line and "--tokenizer" in line
    assert not (root / "hf_no_tokenizer" / "tokenizer.json").exists()


def test_visualize_without_processor_is_a_one_line_hint(exported, capsys):
    from megatron_vwlmm.convert import visualize

    root, _ = exported
    _image().save(root / "in.png")
    rc = visualize.main(["--model", str(root / "hf_no_tokenizer"), "--image",
                         str(root / "in.png"), "--out", str(root / "words.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no processor" in err and "--tokenizer" in err
    assert not (root / "words.png").exists()


def test_missing_tokenizer_path_is_an_error(exported, tmp_path, capsys):
    from megatron_vwlmm.convert import cli

    root, _ = exported
    rc = cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(tmp_path / "hf"),
                   "--tokenizer", str(tmp_path / "typo")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert str(tmp_path / "typo") in err
    assert not (tmp_path / "hf").exists()
