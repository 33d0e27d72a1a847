"""``vwlmm-preprocess``: raw image-text data -> tokenized WebDataset / Arrow shards (Ray job).

Also ``vwlmm-preprocess build-tokenizer OUT_DIR``: write the Mistral-7B tokenizer shipped in
the mistral_common wheel as a Hugging Face tokenizer folder (used by tests and the demo).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from preprocessing.config import (IMAGE_MODES, OUTPUT_FORMATS, OVERLONG, TEMPLATES,
                                  TOKENIZER_BACKENDS, PreprocessConfig)
from preprocessing.sources import SOURCES, option_owners, source_choices
from preprocessing.sources.options import add_flags
from vwlmm_data.encoders import ENCODER_KINDS

EPILOG = """\
examples:
  # LAION-style img2dataset shards (tar + parquet pairs), caption pretraining
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
    vwlmm-preprocess --source laion --input 'data/laion/*.tar' 'data/laion/*.parquet' \\
      --tokenizer tok/ --template plain --output s3://bucket/pretrain --format both

  # LLaVA-665K / ShareGPT4V conversations, as LLaVA-1.5 stage 2 (over-long text truncated)
  vwlmm-preprocess --source llava --input llava_v1_5_mix665k.json --image-root data/images \\
    --tokenizer tok/ --template vicuna_v1 --overlong truncate --output out/sft --format both

  # a HF tokenizer folder from the mistral_common wheel (no network needed)
  vwlmm-preprocess build-tokenizer tok/

  # size a job first: scan, global dedup and plan only (no image work); the same command
  # without --plan-only then continues from the plan
  vwlmm-preprocess --source laion --input 'data/laion/*.tar' 'data/laion/*.parquet' \\
    --tokenizer tok/ --output s3://bucket/pretrain --plan-only

Defaults reproduce LLaVA-1.5's data (preprocess_plain / preprocess_v1 token for token, its
image path bit for bit before JPEG storage); --plain-eos, --image-mode, --exif-transpose,
--jpeg-draft and --tokenizer-backend fast are the named deviations, recorded in the manifest.

Rerunning the same command resumes: finished shards are kept, the rest is redone, and the result
is byte-identical to an uninterrupted run. A rerun whose input files changed (a file added or
removed, another size or mtime / ETag) is refused, naming them. Outside `ray job submit` the
command joins --ray-address (or RAY_ADDRESS) or starts a local Ray. S3 uses boto3's standard AWS
configuration: --s3-endpoint / --s3-region, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL /
AWS_REGION; every Ray worker takes credentials from its own machine's AWS chain (environment,
shared credentials file, instance role), never from the submitting shell.
Output: shards (shard-NNNNNN.tar / .arrow; webdataset/ and arrow/ subfolders with --format
both), manifest.json (written last) and rejects.jsonl (source_id, key, reason, detail); WebDataset
shards come with Megatron-Energon's .nv-meta/ and a .tar.idx each (Energon loads them as they are).
"""


def _float_or_none(s: str):
    return None if s.lower() == "none" else float(s)


def _source_help() -> str:
    """One clause per registered source: ``name (alias a): what its inputs are``."""
    parts = []
    for s in SOURCES.values():
        alias = f" (alias {', '.join(s.aliases)})" if s.aliases else ""
        parts.append(f"{s.name}{alias}: {s.help}")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vwlmm-preprocess", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--source", required=True, choices=source_choices(), help=_source_help())
    io.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="files, globs or s3:// URIs (quote globs). laion: .tar and matching "
                         ".parquet (same stem); llava: .json arrays")
    io.add_argument("--image-root", help="folder or s3:// prefix that LLaVA 'image' paths are relative to")
    io.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    io.add_argument("--format", default="webdataset", choices=OUTPUT_FORMATS,
                    help="shard format (default %(default)s); both = webdataset/ + arrow/ with identical samples")
    io.add_argument("--samples-per-shard", type=int, default=1000,
                    help="input records per unit/shard (default %(default)s); shards hold fewer when records are rejected")
    io.add_argument("--s3-endpoint",
                    help="endpoint URL of an S3-compatible store, e.g. http://127.0.0.1:8333 "
                         "(default: boto3's, i.e. AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS)")
    io.add_argument("--s3-region", help="S3 region (default: boto3's, e.g. AWS_REGION)")
    io.add_argument("--overwrite", action="store_true",
                    help="delete the files of an earlier job in --output first instead of resuming "
                         "(only a job's own files, after every check passed; never a bucket root, "
                         "a home or top-level folder, a folder holding the inputs, or a non-empty "
                         "folder that is no job's output)")
    tk = p.add_argument_group("text")
    tk.add_argument("--tokenizer", required=True,
                    help="Hugging Face tokenizer folder (fast tokenizer, plus tokenizer.model for "
                         "SentencePiece models)")
    tk.add_argument("--tokenizer-backend", default="auto", choices=TOKENIZER_BACKENDS,
                    help="auto: the folder's tokenizer.model when present, encoding as LLaVA's slow "
                         "tokenizer does, else the fast tokenizer (whose whitespace handling "
                         "differs) (default %(default)s)")
    tk.add_argument("--template", default="plain", choices=TEMPLATES,
                    help="plain: image + caption + \"\\n\" (LLaVA pretraining); vicuna_v1 (LLaVA-1.5) / "
                         "mistral (VW-LMM): chat, answers + EOS supervised (default %(default)s)")
    tk.add_argument("--plain-eos", action="store_true",
                    help="plain: end the caption with EOS instead of LLaVA's \"\\n\"")
    tk.add_argument("--max-seq-len", type=int, default=2048,
                    help="maximum tokens after image splicing, each image counting its patches (default %(default)s)")
    tk.add_argument("--overlong", default="drop", choices=OVERLONG,
                    help="samples over --max-seq-len: drop (reject 'too_long') or truncate the text "
                         "at the end, keeping images whole (LLaVA truncates; default %(default)s)")
    tk.add_argument("--no-dedup", dest="dedup", action="store_false",
                    help="keep exact duplicates (same image bytes and text); dedup is on by default")
    im = p.add_argument_group("images")
    im.add_argument("--vision-encoder", default="clip", choices=ENCODER_KINDS,
                    help="the encoder the images are for: its mean colour pads them and its "
                         "mean/std go into the manifest for the trainer (default %(default)s)")
    im.add_argument("--image-size", type=int, default=336, help="vision resolution (default %(default)s)")
    im.add_argument("--patch-size", type=int, default=14,
                    help="vision patch size; an image counts (size/patch)^2 tokens (default %(default)s)")
    im.add_argument("--image-mode", default=None, choices=IMAGE_MODES,
                    help="pad: LLaVA's expand2square with the encoder's mean colour, then resize; crop: "
                         "CLIP's short side + centre crop (LLaVA's 'square'); resize: squash "
                         "(default: crop with --template plain, as LLaVA-1.5 pretraining; pad "
                         "otherwise, as its fine-tuning)")
    im.add_argument("--exif-transpose", action="store_true",
                    help="apply EXIF orientation (LLaVA does not; default off)")
    im.add_argument("--jpeg-draft", action="store_true",
                    help="decode large JPEGs at a reduced scale: faster, pixels differ from "
                         "LLaVA's full decode (default off)")
    im.add_argument("--jpeg-quality", type=int, default=95, help="re-encoding quality (default %(default)s)")
    im.add_argument("--max-image-pixels", type=int, default=89_478_485,
                    help="decompression-bomb limit in pixels (default %(default)s)")
    im.add_argument("--max-image-bytes", type=int, default=64 << 20,
                    help="largest image file or tar member read, in bytes; bigger ones are "
                         "rejected unread as 'file_too_large' (default %(default)s = 64 MiB)")
    im.add_argument("--min-image-side", type=int, default=10,
                    help="reject images whose short side is smaller (default %(default)s)")
    im.add_argument("--max-aspect-ratio", type=_float_or_none, default=None,
                    help="reject images with long/short side above this (default off)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--num-workers", type=int,
                    help="concurrent Ray tasks (default: the cluster's CPUs); never changes the output")
    rt.add_argument("--ray-address", help="Ray cluster to join, e.g. 127.0.0.1:6379 (default: RAY_ADDRESS or a local Ray)")
    rt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    rt.add_argument("--plan-only", action="store_true",
                    help="scan, dedup and plan, then stop (no image work): logs the job's records, "
                         "units, duplicates and renamed ids; a later run without it continues")
    rt.add_argument("--dedup-partitions", type=int, metavar="P",
                    help="partitions of the distributed dedup step, each one task holding its "
                         "share of the records (default: one per million records); never "
                         "changes the output")
    rt.add_argument("--max-in-flight", type=int, metavar="K",
                    help="Ray tasks submitted at once (default: 2 x workers); bounds scheduler "
                         "and driver memory on jobs of millions of units; never changes the output")
    add_flags(p, SOURCES.values())
    return p


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    if path is None or path.startswith("s3://"):
        return path
    return os.path.abspath(path)


def config_from_args(argv: list[str] | None = None) -> PreprocessConfig:
    args = build_parser().parse_args(argv)
    kwargs = vars(args)
    kwargs["inputs"] = [_absolute(p) for p in kwargs.pop("input")]
    kwargs["source_options"] = {k: kwargs.pop(k) for k in option_owners() if k in kwargs}
    for name in ("image_root", "tokenizer", "output"):
        kwargs[name] = _absolute(kwargs[name])
    return PreprocessConfig(**kwargs)


def _build_tokenizer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vwlmm-preprocess build-tokenizer",
        description="Convert Mistral-7B's SentencePiece model from the mistral_common wheel into "
                    "a Hugging Face tokenizer folder (32000 pieces, BOS=1, EOS=2), with the "
                    "model itself as tokenizer.model, as Hugging Face Mistral repositories ship it.")
    p.add_argument("out_dir", help="folder to create (kept as it is if it already holds "
                                   "tokenizer.json; any other non-empty folder is refused)")
    args = p.parse_args(argv)
    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    try:
        print(build_mistral_hf_tokenizer(args.out_dir))
    except FileExistsError as exc:
        print(f"vwlmm-preprocess build-tokenizer: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] == "build-tokenizer":
        return _build_tokenizer(argv[1:])
    try:
        cfg = config_from_args(argv)
    except ValueError as exc:
        print(f"vwlmm-preprocess: error: {exc}", file=sys.stderr)
        return 2
    from preprocessing.runner import run
    from preprocessing.scheduling import TaskFailed
    from vwlmm_data.run_lock import RunLockHeld

    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RunLockHeld, TaskFailed) as exc:  # bad inputs, a
        # config clash, another job on --output, a unit no worker could finish: no traceback
        logging.getLogger("vwlmm.preprocess").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
