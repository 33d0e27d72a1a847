"""HF import -> train from it (and resume) -> export: the export is the whole model.

One spawned process runs the real code paths in order: ``import_hf`` of the tiny Llama + CLIP,
``pipeline.train.run`` from the import (two steps, a checkpoint each, keep_last=1), a resumed
run to step 3, both exports of the run folder, the trained megatron model's logits; then two
more runs in the same checkpoint folder: a new run (``checkpoint.auto_resume=false``) beside
the older, higher-iteration checkpoint, and its resume. The checks below read the results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks
from tests.megatron_vwlmm.convert import fixtures as fx
from tests.pipeline.launch import REPO

pytestmark = pytest.mark.timeout(600)

# The trainer's preset reshaped to the tiny HF Llama of fixtures.py (the import's shape).
MODEL_SETS = ["model.preset=tiny", "model.decoder.num_layers=2", "model.decoder.num_query_groups=4",
              "model.decoder.vocab_size=256", f"model.decoder.seq_length={fx.SEQ}",
              "model.decoder.rotary_base=500000.0", "model.decoder.norm_epsilon=1e-6",
              "model.freeze_vision=true"]
RUN_SETS = ["parallel.tp=1", "logging.tensorboard=false", "train.eval_interval=0",
            "data.valid_fraction=0", "data.num_workers=0", "data.format=arrow",
            "data.micro_batch_size=2", "data.global_batch_size=4", "optim.lr=1e-2",
            "optim.warmup_iters=1", "checkpoint.save_interval=1", "checkpoint.keep_last=1"]


def _train(root: Path, run: str, *sets: str) -> int:
    """``pipeline.train.run`` in this process (a fresh process group each time)."""
    from megatron_vwlmm.parallel.launch import find_free_port
    from pipeline.config import load_config
    from pipeline.train import run as train_run

    os.environ["MASTER_PORT"] = str(find_free_port())
    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"),
                      MODEL_SETS + RUN_SETS + [f"data.path={root / 'data'}",
                                               f"run_dir={root / run}", *sets])
    return train_run(cfg)["state"].iteration


def _import_train_export(root: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_vwlmm.checkpoint.layout import Marker
    from megatron_vwlmm.convert.exporter import export_checkpoint
    from megatron_vwlmm.convert.importer import import_hf
    from megatron_vwlmm.convert.megatron_io import megatron_process
    from pipeline.data.synthetic import make_samples, write_dataset

    root = Path(root)
    out: dict = {}
    import_hf(str(root / "llama"), str(root / "clip"), str(root / "import"), seq_length=fx.SEQ,
              projector=str(root / "proj.bin"))
    write_dataset(str(root / "data"), make_samples(8, seed=5, vocab=fx.VOCAB), shard_size=8,
                  formats=("arrow",), vocab_size=fx.VOCAB)
    init = f"model.init_from={root / 'import'}"
    out["first"] = _train(root, "run", init, "train.train_iters=2")
    ckpts = root / "run" / "checkpoints"
    out["after_first"] = sorted(p.name for p in ckpts.iterdir())
    out["resumed"] = _train(root, "run", init, "train.train_iters=3")
    common = dist_checkpointing.load_common_state_dict(str(ckpts / "iter_0000003"))
    out["provenance"] = common["provenance"]
    export_checkpoint(str(root / "run"), str(root / "llava"), format="llava-hf")
    export_checkpoint(str(root / "run"), str(root / "vwlmm"), format="vwlmm")
    with megatron_process():
        for name, folder in (("trained", ckpts / "iter_0000003"), ("import", root / "import")):
            out[f"{name}_logits"] = fx.megatron_outputs(str(folder), fx.batch())["logits"]

    # A new run beside the first run's iter_0000003 (a higher iteration than it saves), then
    # its resume: its own checkpoints must survive its pruning, and `latest` must stay loadable.
    old_run_id = Marker.read(ckpts / "iter_0000003").run_id
    out["fresh"] = _train(root, "run", init, "train.train_iters=2", "checkpoint.auto_resume=false")
    out["after_fresh"] = sorted(p.name for p in ckpts.iterdir())
    out["fresh_latest"] = (ckpts / "latest").read_text().strip()
    fresh_run_id = Marker.read(ckpts / out["fresh_latest"]).run_id
    out["fresh_resumed"] = _train(root, "run", init, "train.train_iters=3")
    out["after_fresh_resumed"] = sorted(p.name for p in ckpts.iterdir())
    out["run_ids"] = {"old": old_run_id, "fresh": fresh_run_id,
                      "final": Marker.read(ckpts / "iter_0000003").run_id}
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("import_train_export")
    fx.make_llm_dir(root / "llama", "llama")
    fx.make_clip_dir(root / "clip")
    fx.make_projector(root / "proj.bin")
    result = run_on_ranks(_import_train_export, 1, args=(str(root),), timeout_s=540)[0]
    return root, result


def test_provenance_is_carried_through_training_and_resume(trained):
    root, r = trained
    assert (r["first"], r["resumed"]) == (2, 3)
    assert r["after_first"] == ["iter_0000002", "latest"]  # keep_last=1 pruned iter_0000001
    prov = r["provenance"]
    assert prov["import_dir"] == str((root / "import").resolve())
    assert prov["tokenizer"] == str((root / "llama").resolve())
    assert prov["conversion"]["architecture"] == "llama"
    # every checkpoint carries its own copy of the import's vision tail
    tail = (root / "import" / "vision_tail.safetensors").read_bytes()
    assert (root / "run/checkpoints/iter_0000003/vision_tail.safetensors").read_bytes() == tail


@pytest.mark.parametrize("fmt, prefix", [
    ("llava", "model.vision_tower."), ("vwlmm", "model.vision_tower.vision_tower.vision_model.")])
def test_export_holds_the_whole_vision_tower_and_tokenizer(trained, fmt, prefix):
    from transformers import AutoTokenizer

    from megatron_vwlmm.convert.hf_io import read_hf_tensors
    from megatron_vwlmm.convert.layouts import vision_keys

    root, _ = trained
    source = vision_keys(read_hf_tensors(root / "clip"))
    exported = read_hf_tensors(root / fmt)
    vision = {k[len(prefix):]: exported[k] for k in exported if k.startswith(prefix)}
    assert set(vision) == set(source)
    assert any(k.startswith("encoder.layers.2.") for k in source)  # the layer the model skips
    for key, value in source.items():
        assert torch.equal(vision[key], value), f"{fmt} export: vision {key} differs from source"
    want = AutoTokenizer.from_pretrained(root / "llama").get_vocab()
    got = AutoTokenizer.from_pretrained(root / fmt).get_vocab()
    if fmt == "llava":
        want["<image>"] = fx.VOCAB
    assert got == want


def test_stock_transformers_logits_match_the_trained_model(trained):
    from transformers import LlavaForConditionalGeneration

    root, r = trained
    b = fx.batch()
    ids = b.tokens.clone()
    ids[b.image_token_mask] = fx.VOCAB
    stock = LlavaForConditionalGeneration.from_pretrained(
        root / "llava", attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = stock(input_ids=ids, pixel_values=b.images,
                       attention_mask=torch.ones_like(ids)).logits[..., :fx.VOCAB]
    ours, start = r["trained_logits"], r["import_logits"]
    rel = float((logits - ours).norm() / ours.norm())
    print(f"stock transformers vs trained megatron: rel {rel:.2e}")
    assert rel <= 1e-5
    assert float((ours - start).norm() / start.norm()) > 1e-3  # training moved the weights


def test_new_run_beside_higher_checkpoints_keeps_its_own(trained):
    """checkpoint.auto_resume=false in a folder holding a higher iteration: each new save stays
    (pruning is within the run, below the new iteration), `latest` names it, resume works."""
    _, r = trained
    assert r["fresh"] == 2
    assert r["fresh_latest"] == "iter_0000002"
    assert r["after_fresh"] == ["iter_0000002", "iter_0000003", "latest"]
    assert r["fresh_resumed"] == 3
    assert r["after_fresh_resumed"] == ["iter_0000003", "latest"]
    ids = r["run_ids"]
    assert ids["old"] != ids["fresh"] and ids["final"] == ids["fresh"]
