"""``vwlmm-train --plan`` (``pipeline/plan.py``).

The parameter, gradient and optimizer bytes it predicts per rank are exactly those of real
models built by the trainer's own code (``pipeline/model_setup.py``, ``pipeline/optim.py``) on
four gloo ranks: TP=2 and PP=2 (also interleaved, and PIF) at DP=2, the distributed optimizer on
and off, stage-1 (LLM frozen) and stage-2 settings, fp32 and bf16, one and two grad buckets;
one launch re-initialises megatron's groups for each layout. The README's table is the
planner's output, and what the README says of its multi-node example is the planner's verdict.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_vwlmm.parallel.launch import run_on_ranks
from pipeline import plan
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny-cpu.yaml")


def _case_sets(tp, pp, distributed, stage, bf16, vpp=None, pif=False):
    sets = [f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.use_distributed_optimizer={str(distributed).lower()}",
            f"model.freeze_decoder={str(stage == 1).lower()}",
            f"precision.bf16={str(bf16).lower()}", f"model.pif={str(pif).lower()}"]
    if vpp:
        sets.append(f"parallel.vpp={vpp}")
    return sets


CASES = [_case_sets(tp, pp, distributed, stage, bf16=stage == 2)
         for tp, pp in ((2, 1), (1, 2)) for distributed in (True, False) for stage in (1, 2)]
CASES += [_case_sets(1, 2, True, 2, bf16=True, vpp=2),
          _case_sets(1, 2, True, 2, bf16=False, pif=True),
          _case_sets(1, 2, False, 1, bf16=True, pif=True),
          # Over megatron's 40M-element bucket floor: overlap_grad_reduce cuts two buckets.
          _case_sets(2, 1, True, 2, bf16=False) + ["parallel.overlap_grad_reduce=true",
                                                   "model.decoder.hidden_size=1288"]]


def _real_state(cases):
    """Per case: (pp rank, dp rank, parameter, gradient and optimizer bytes) of this rank."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_vwlmm.parallel.initialize import set_seed
    from pipeline.model_setup import build_model_chunks
    from pipeline.optim import build_optimizer

    found = []
    for sets in cases:
        cfg = load_config(CONFIG, sets)
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tp,
                                     pipeline_model_parallel_size=cfg.parallel.pp,
                                     virtual_pipeline_model_parallel_size=cfg.parallel.vpp)
        set_seed(1234)
        chunks = build_model_chunks(cfg)
        optimizer = build_optimizer(cfg, chunks)
        optimizer.step()  # Adam's moments exist from the first step on (zero gradients here)
        model_storages, params, grads = set(), 0, 0
        for chunk in chunks:
            for buffer in chunk.buffers:
                grads += buffer.grad_data.numel() * buffer.grad_data.element_size()
                if buffer.param_data is not None:  # the distributed optimizer's param buffer
                    params += buffer.param_data.numel() * buffer.param_data.element_size()
                    model_storages.add(buffer.param_data.untyped_storage().data_ptr())
            for p in chunk.module.parameters():
                model_storages.add(p.untyped_storage().data_ptr())
                if not (cfg.parallel.use_distributed_optimizer and p.requires_grad):
                    params += p.numel() * p.element_size()
        state = 0
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            for per_param in inner.optimizer.state.values():
                state += sum(per_param[k].numel() * per_param[k].element_size()
                             for k in ("exp_avg", "exp_avg_sq"))
            for group in inner.optimizer.param_groups:  # fp32 master copies, not the model's
                state += sum(p.numel() * p.element_size() for p in group["params"]
                             if p.untyped_storage().data_ptr() not in model_storages)
        found.append((ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
                      params, grads, state))
        del optimizer, chunks
        torch.distributed.barrier()
    return found


@pytest.fixture(scope="module")
def real_states():
    return run_on_ranks(_real_state, 4, args=(CASES,), timeout_s=1200)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(c) for c in CASES])
def test_state_bytes_equal_the_real_models_tensors(real_states, index):
    cfg = load_config(CONFIG, CASES[index])
    dp = 4 // (cfg.parallel.tp * cfg.parallel.pp)
    for rank, per_case in enumerate(real_states):
        pp_rank, dp_rank, params, grads, optimizer = per_case[index]
        predicted = plan.rank_state(cfg, dp, pp_rank, dp_rank)
        assert (predicted.params, predicted.grads, predicted.optimizer) == \
            (params, grads, optimizer), f"rank {rank} (stage {pp_rank}, DP rank {dp_rank})"


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- plan-table -->\n(.*?)\n<!-- /plan-table -->", text, re.S)
    assert match, "README.md: no <!-- plan-table --> block"
    return match.group(1)


def test_readme_table_is_the_planners_output():
    assert _readme_block() == plan.readme_table(str(REPO))


def _multi_node_example():
    """(GPUs, config, --set arguments) of the sbatch line in "Multi-node in 6 steps"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Multi-node in 6 steps"):text.index("## Preprocessing")]
    joined = re.sub(r"\\\n\s*", " ", section)
    line = next(l.strip() for l in joined.splitlines()
                if l.strip().startswith("sbatch") and "train.sbatch" in l)
    words = shlex.split(line)
    gpus = int(words[words.index("--nodes") + 1]) * int(words[words.index("--gpus-per-node") + 1])
    config = words[words.index("cluster/slurm/train.sbatch") + 1]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return gpus, config, sets


def test_the_readme_states_the_planners_verdict_on_its_multi_node_example():
    """The README's multi-node launch, planned on 80 GB cards: it fits, with the peak the README
    quotes; the peak it quotes for selective recompute does not fit."""
    gpus, config, sets = _multi_node_example()
    cfg = load_config(str(REPO / config), sets)
    result = plan.plan(cfg, gpus, 80 * plan.GIB)
    assert result.fits
    text = (REPO / "README.md").read_text()
    quoted = re.search(r"needs about (\d+) GiB per GPU and fits 80 GB cards", text)
    assert quoted and int(quoted.group(1)) == round(result.peak / plan.GIB)
    selective = plan.plan(load_config(str(REPO / config), sets + [
        "parallel.recompute_granularity=selective"]), gpus, 80 * plan.GIB)
    quoted = re.search(r"recompute_granularity=selective` it would need about (\d+) GiB", text)
    assert quoted and int(quoted.group(1)) == round(selective.peak / plan.GIB)
    assert not selective.fits


def test_every_preset_gets_an_answer_on_8_to_256_gpus():
    for path in plan.PRESET_CONFIGS:
        cfg = load_config(str(REPO / path))
        for gpus in (8, 16, 32, 64, 128, 256):
            if plan.layout_error(cfg, gpus) is None and plan.plan(cfg, gpus, 80 * plan.GIB).fits:
                continue
            fixes = plan.suggestions(cfg, gpus, 80 * plan.GIB)
            assert fixes, f"{path} on {gpus} GPUs"
            for _, fixed in fixes:
                assert fixed.fits and plan.layout_error(fixed.cfg, gpus) is None


def test_suggested_changes_fit_when_applied():
    """The ``--set`` arguments printed for a layout that does not fit give one that does."""
    path = str(REPO / "configs/stage2-vicuna-7b.yaml")
    cfg = load_config(path)
    assert not plan.plan(cfg, 8, 40 * plan.GIB).fits
    for sets, _ in plan.suggestions(cfg, 8, 40 * plan.GIB):
        assert plan.plan(load_config(path, sets), 8, 40 * plan.GIB).fits, sets


def test_plan_cli_reports_the_verdict_in_its_exit_code():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.train", "--plan", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    fits = run("--config", "configs/stage1-vicuna-7b.yaml", "--gpus", "8",
               "--set", "data.micro_batch_size=2", "--peak-tflops", "989")
    assert fits.returncode == 0, fits.stderr
    assert "verdict: fits" in fits.stdout and "MFU" in fits.stdout
    assert re.search(r"^stage 0 +[0-9.]+", fits.stdout, re.M)
    tight = run("--config", "configs/stage2-vicuna-7b.yaml", "--gpus", "8",
                "--gpu-memory", "40GB")
    assert tight.returncode == 3, tight.stderr
    assert "does not fit" in tight.stdout and "--set " in tight.stdout
    invalid = run("--config", "configs/stage1-vicuna-7b.yaml", "--gpus", "32")
    assert invalid.returncode == 3 and "global_batch_size" in invalid.stdout
    assert "--set data.micro_batch_size=" in invalid.stdout


def test_the_dataset_manifest_sets_the_workload():
    """With a finished dataset at ``data.path`` the planner plans its mean sample: stage-1
    samples (576 image positions + a caption) pack three to a row, and the padded run's step
    computes its padding, so its MFU is lower."""
    statistics = SimpleNamespace(mean_tokens=606.4, num_images=1000)
    manifest = SimpleNamespace(num_samples=1000, statistics=statistics)
    path = str(REPO / "configs/stage1-vicuna-7b.yaml")
    packed = load_config(path, ["data.packing=true", "data.micro_batch_size=1"])
    work = plan.Workload.from_manifest(packed, manifest)
    assert (work.sample_positions, work.images_per_row, work.images_per_sample) == (606, 3, 1.0)
    padded = load_config(path, ["data.micro_batch_size=4"])
    padded_work = plan.Workload.from_manifest(padded, manifest)
    assert padded_work.images_per_row == 1
    fast = plan.plan(packed, 8, 80 * plan.GIB, work=work, peak_tflops=989)
    slow = plan.plan(padded, 8, 80 * plan.GIB, work=padded_work, peak_tflops=989)
    assert fast.step_time_s < slow.step_time_s and fast.mfu > slow.mfu
