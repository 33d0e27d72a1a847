"""``vwlmm-convert``: Hugging Face <-> megatron checkpoints of VW-LMM, verified by logit parity
in the test suite (tests/megatron_vwlmm/convert)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

EPILOG = """examples:
  vwlmm-convert import --llm lmsys/vicuna-7b-v1.5 --vision openai/clip-vit-large-patch14-336 \\
      --tp 2 --pp 2 --out ckpt/init            # local HF folders; then train with
                                               # model.init_from=ckpt/init
  vwlmm-convert import --vwlmm MYTH-Lab/VW-LMM-Vicuna --out ckpt/vwlmm
  vwlmm-convert import --llava liuhaotian/llava-v1.5-7b --vision openai/clip-vit-large-patch14-336 \\
      --out ckpt/from-llava          # VW-LMM from LLaVA-1.5: VM head = copy of its LM head
  vwlmm-convert export --checkpoint runs/x/checkpoints --format llava-hf --out hf/x --dtype bf16
  vwlmm-convert export --checkpoint ckpt/vwlmm --format vwlmm --out hf/orig
"""


def _parser() -> argparse.ArgumentParser:
    from megatron_vwlmm.convert.processor import CHAT_TEMPLATES

    p = argparse.ArgumentParser(
        prog="vwlmm-convert", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF folders -> megatron dist checkpoint",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--llm", help="HF Llama/Vicuna/Mistral causal-LM folder (needs --vision)")
    src.add_argument("--vwlmm", "--llava", dest="vwlmm",
                     help="HF folder in the LLaVA layout: a VW-LMM checkpoint (whole model) or "
                          "LLaVA-1.5 (no vm_head: initialised per --vm-head-init); recognised by "
                          "its weights and config fields, Llama or Mistral from the config")
    imp.add_argument("--vision", help="HF vision model folder (CLIP or SigLIP, full or "
                                      "vision-only); with --vwlmm/--llava only needed "
                                      "when mm_vision_tower is not a local folder and the "
                                      "checkpoint lacks the tower's weights or it is unknown")
    imp.add_argument("--projector", help="optional LLaVA stage-1 mm_projector weights "
                                         "(.bin/.safetensors); default: fresh initialisation")
    imp.add_argument("--vm-head-init", choices=("lm_head", "random"), default="lm_head",
                     help="VM head starts as a copy of the LM head (paper) or random (when the "
                          "source has none)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for")
    imp.add_argument("--seq-length", type=int, help="training sequence length recorded in the "
                                                    "config (default min(context, 4096))")
    imp.add_argument("--pif", action=argparse.BooleanOptionalAction, default=None,
                     help="PIF model (the weights cannot tell); --vwlmm default: VW-LMM's rule, "
                          "'pif' in the folder name; --llm default: no")
    imp.add_argument("--out", required=True, help="new megatron checkpoint folder")

    exp = sub.add_parser("export", help="megatron checkpoint (any TP/PP) -> HF folder",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument("--checkpoint", required=True,
                     help="import output, trainer iter_* folder, checkpoint root or run folder")
    exp.add_argument("--format", choices=("llava-hf", "vwlmm"), default="llava-hf")
    exp.add_argument("--out", required=True, help="new HF folder")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    exp.add_argument("--tokenizer", help="HF tokenizer folder (default: the one the checkpoint "
                                         "records: the imported LLM's, else the one the run's "
                                         "data was preprocessed with); must exist")
    exp.add_argument("--template", choices=tuple(CHAT_TEMPLATES),
                     help="chat template (default: the run data's template, else by decoder "
                          "family)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vwlmm-convert %(message)s")
    from megatron_vwlmm.parallel.megatron_compat import quiet_known_warnings

    quiet_known_warnings()
    from megatron_vwlmm.convert.errors import (
        IncompleteCheckpointError,
        UnsupportedModelError,
        VocabMismatchError,
    )

    try:
        if args.command == "import":
            from megatron_vwlmm.convert.importer import import_hf, import_original

            if args.vwlmm:
                out = import_original(args.vwlmm, args.out, tp=args.tp, pp=args.pp,
                                      vision_dir=args.vision, seq_length=args.seq_length,
                                      pif=args.pif, vm_head_init=args.vm_head_init)
            else:
                if not args.vision:
                    raise SystemExit("vwlmm-convert import: --llm needs --vision")
                out = import_hf(args.llm, args.vision, args.out, tp=args.tp, pp=args.pp,
                                vm_head_init=args.vm_head_init, projector=args.projector,
                                seq_length=args.seq_length, pif=bool(args.pif))
        else:
            from megatron_vwlmm.convert.exporter import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.out, format=args.format,
                                    tokenizer_dir=args.tokenizer, dtype=args.dtype,
                                    template=args.template)
    except (IncompleteCheckpointError, UnsupportedModelError, VocabMismatchError, ValueError,
            FileNotFoundError, FileExistsError) as exc:
        print(f"vwlmm-convert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"vwlmm-convert {args.command}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
