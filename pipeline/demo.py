"""`make demo`: the whole main job on one CPU machine, end to end, in a few minutes.

1. bundled fixtures (LAION-style img2dataset tars + parquet) -> tokenized Arrow + WebDataset
   shards with the *real* preprocessing Ray job (`ray job submit ... -- vwlmm-preprocess`)
   on a private Ray head bound to 127.0.0.1;
2. the `tiny-cpu` VW-LMM trained with TP=2 under torchrun (gloo) for a few dozen steps;
3. megatron dist checkpoints, metrics (stdout, JSONL, TensorBoard) and a loss-curve PNG;
4. export to a Hugging Face llava-hf folder, a caption generated from it with stock
   transformers (`AutoProcessor` + `generate`), and the paper's visual-word map of an image.

Everything goes under --out (default ./demo_out); the last lines say where. A rerun replaces
the demo's own folders there (``DEMO_FOLDERS``), and only in a folder the demo marked as its own
(``DEMO_MARKER``); where those folders exist with files and no mark, the demo refuses to start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preprocessing.local_ray import LocalRayHead, free_port, ray_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What the demo writes under --out, and the file that says it wrote them.
DEMO_FOLDERS = ("raw", "tokenizer", "data", "run", "hf")
DEMO_MARKER = ".vwlmm-demo"


def claim_out(out: Path) -> None:
    """Mark ``out`` as the demo's, or refuse (SystemExit) when it holds non-empty folders of
    the demo's names that an earlier demo did not write: a rerun deletes and rewrites those."""
    if not (out / DEMO_MARKER).is_file():
        taken = [name for name in DEMO_FOLDERS if (out / name).exists()
                 and (not (out / name).is_dir() or any((out / name).iterdir()))]
        if taken:
            raise SystemExit(f"{out} already holds {', '.join(taken)} that the demo did not write "
                             f"(no {DEMO_MARKER} there); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by python -m pipeline.demo; a rerun replaces "
                                   + ", ".join(DEMO_FOLDERS) + "\n")


def _service_env() -> dict:
    return ray_env(pythonpath=str(REPO), OMP_NUM_THREADS="1")


def _step(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def preprocess(out: Path) -> Path:
    from preprocessing.fixtures import write_demo_dataset
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    _step("1/5 fixtures + tokenizer")
    raw = write_demo_dataset(out / "raw", max_side=96, laion_per_tar=16)
    tokenizer = build_mistral_hf_tokenizer(out / "tokenizer")
    print(f"raw LAION-style inputs: {raw.laion_inputs}\ntokenizer: {tokenizer}")

    _step("2/5 preprocessing Ray job (ray job submit ... -- vwlmm-preprocess)")
    data = out / "data"
    with LocalRayHead(_service_env()) as head:
        workdir = Path(tempfile.mkdtemp(prefix="vwlmm-job-"))
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
               "--working-dir", str(workdir), "--", "vwlmm-preprocess", "--source", "laion",
               "--input", *raw.laion_inputs, "--tokenizer", str(tokenizer), "--template",
               "plain", "--output", str(data), "--format", "both", "--image-size", "32",
               "--patch-size", "8", "--max-seq-len", "64", "--samples-per-shard", "8",
               "--overwrite", "--no-progress"]
        res = subprocess.run(cmd, env=head.env, text=True)  # head.env carries its token
        shutil.rmtree(workdir, ignore_errors=True)
        if res.returncode != 0:
            raise SystemExit(f"preprocessing job failed (exit {res.returncode})")
    manifest = json.loads((data / "manifest.json").read_text())
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"rejected {manifest['rejected']}")
    return data


def train(out: Path, data: Path, steps: int) -> Path:
    _step(f"3/5 training tiny-cpu with TP=2 under torchrun ({steps} steps)")
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # a demo always starts fresh (claim_out: ours)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pipeline.train",
           "--config", str(REPO / "configs/tiny-cpu.yaml"), "--set", f"data.path={data}",
           "--set", f"run_dir={run}", "--set", f"train.train_iters={steps}",
           "--set", "parallel.tp=2"]
    res = subprocess.run(cmd, env=_service_env())
    if res.returncode != 0:
        raise SystemExit(f"training failed (exit {res.returncode})")
    return run


def report(run: Path) -> Path:
    from pipeline.checkpoint import latest_checkpoint
    from pipeline.metrics import read_metrics
    from pipeline.plot import plot

    _step("4/5 results")
    png = plot(run, run / "loss.png")
    records = [r for r in read_metrics(run) if r["split"] == "train"]
    first, last = records[0], records[-1]
    for key in ("lm_loss", "vm_loss"):
        peak = max(records, key=lambda r: r[key])
        print(f"{key}: {first[key]:.4f} (iteration 1), peak {peak[key]:.4f} (iteration "
              f"{peak['iteration']}) -> {last[key]:.4f} (iteration {last['iteration']})")
    ckpt = latest_checkpoint(run / "checkpoints")
    print(f"\ncheckpoint:   {ckpt}\nmetrics:      {run / 'metrics.jsonl'}\n"
          f"tensorboard:  {run / 'tensorboard'}\nloss curves:  {png}")
    return ckpt


def export_and_caption(out: Path, ckpt: Path) -> tuple[Path, Path, Path]:
    """The trained checkpoint as a stock-transformers model: caption a training image with it
    and draw its visual words (paper Fig. 10)."""
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.exporter import export_checkpoint
    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration
    from megatron_vwlmm.convert.visualize import visualize

    _step("5/5 Hugging Face export, caption, visual words")
    hf_dir = out / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)  # ours (claim_out)
    export_checkpoint(str(ckpt), str(hf_dir), format="llava-hf",
                      tokenizer_dir=str(out / "tokenizer"))
    image_path = sorted((out / "raw").rglob("*.jpg"))[0]
    processor = AutoProcessor.from_pretrained(hf_dir)
    model = VWLMMForConditionalGeneration.from_pretrained(hf_dir).eval()
    # The `plain` pretraining template: the image, then the caption.
    inputs = processor(images=Image.open(image_path).convert("RGB"), text="<image>",
                       return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    caption = processor.decode(generated[0, inputs["input_ids"].shape[1]:],
                               skip_special_tokens=True)
    words_png, words_txt = visualize(str(hf_dir), str(image_path), str(out / "visual_words.png"))
    print(f"HF model:     {hf_dir} (loads with transformers' LlavaForConditionalGeneration)")
    print(f"caption of {image_path.name}: {caption.strip()!r}")
    print(f"visual words: {words_png} (table: {words_txt})")
    return hf_dir, Path(words_png), Path(words_txt)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description="End-to-end CPU demo: Ray preprocessing of bundled fixtures -> tiny VW-LMM "
                    "trained with TP=2 (torchrun, gloo) -> checkpoint -> loss plot -> HF export "
                    "-> caption and visual-word map.")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="output folder (default: ./demo_out)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    args = parser.parse_args(argv)
    from megatron_vwlmm.parallel.megatron_compat import quiet_known_warnings

    quiet_known_warnings()  # for the export step, which runs megatron in this process
    t0 = time.time()
    out = args.out.resolve()
    claim_out(out)
    data = preprocess(out)
    run = train(out, data, args.steps)
    ckpt = report(run)
    hf_dir, words_png, words_txt = export_and_caption(out, ckpt)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs:")
    for what, path in (("tokenized dataset (manifest.json, arrow/, webdataset/)", data),
                       ("training run (metrics.jsonl, tensorboard/)", run),
                       ("loss curves", run / "loss.png"), ("megatron checkpoint", ckpt),
                       ("Hugging Face llava-hf model", hf_dir),
                       ("visual-word map", words_png), ("visual-word table", words_txt)):
        print(f"  {what:<56} {path}")


if __name__ == "__main__":
    main()
