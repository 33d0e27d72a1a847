"""LLaVA-1.5's own data preparation as the test oracle: its real functions, run under its pins.

LLaVA's code is not copied here. ``install()`` puts the ``llava-torch`` 1.2.2.post1 wheel from
PyPI (haotian-liu/LLaVA's own release; its ``llava/train/train.py``, ``llava/mm_utils.py`` and
``llava/conversation.py`` are those of haotian-liu/LLaVA commit
c121f0432da27facab705978f83c4ada465e46fd) and the versions LLaVA pins for its tokenizer
(transformers 4.37.2, tokenizers 0.15.1, sentencepiece 0.1.99) into a folder under the ignored
``build/``, once; ``run()`` starts one subprocess with that folder first on ``sys.path`` (the
project's transformers always returns the fast tokenizer, LLaVA loads the slow ``LlamaTokenizer``)
and computes every job there at once: ``LazySupervisedDataset.__getitem__``'s text path
(``preprocess_multimodal`` for records with an image, then ``preprocess`` ->
``preprocess_v1`` / ``preprocess_plain`` with ``tokenizer_image_token``), the tokenizer loaded
and configured as ``llava/train/train.py``'s ``train()`` does.

VW-LMM (pengts/VW-LMM) ships no package: its ``visual_words/conversation.py`` is read from the
file ``VWLMM_CONVERSATION`` names (a checkout of pengts/VW-LMM), and its ``mistral`` prompt is
tokenized with LLaVA's ``tokenizer_image_token`` (VW-LMM's ``mm_utils`` has the same function).
VW-LMM published no training code; its labels here are the tokens from the end of each
``[/INST]`` through the round's ``</s>``, each prefix tokenized in one call.

Run as a script (the subprocess), this file imports only LLaVA, its pins and the standard
library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PINS = ("llava-torch==1.2.2.post1", "transformers==4.37.2", "tokenizers==0.15.1",
        "sentencepiece==0.1.99", "huggingface_hub==0.20.3")
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "llava-oracle"


def install() -> Path:
    """The folder holding LLaVA and its pins (installed on first use, then reused)."""
    target = CACHE / hashlib.sha256("\n".join(PINS).encode()).hexdigest()[:16]
    if (target / "llava" / "train" / "train.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=CACHE))
    try:
        # --no-deps: torch, numpy, PIL and the rest come from the project's environment;
        # LLaVA's other pins (gradio, deepspeed, ...) serve neither tokenization nor import.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--target", str(staging), *PINS],
                       check=True, timeout=600)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "llava" / "train" / "train.py").is_file():  # a concurrent install won
            return target
        raise
    return target


def run(jobs: list[dict]) -> list[dict]:
    """Each job {tokenizer, template: plain|vicuna_v1|mistral, entry} -> {input_ids, labels,
    mismatch, boundary} or {error}, all computed in one subprocess."""
    target = install()
    env = {**os.environ, "PYTHONPATH": str(target), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=900, cwd=str(target))
    if proc.returncode:
        raise RuntimeError(f"LLaVA oracle failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


# -- the subprocess ------------------------------------------------------------------------------

def _tokenizer(path: str):
    """As ``train()`` in llava/train/train.py: the slow tokenizer, pad = unk."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path, model_max_length=8192,
                                                     padding_side="right", use_fast=False)
    assert not tok.is_fast and type(tok).__name__ == "LlamaTokenizer", type(tok)
    tok.pad_token = tok.unk_token
    return tok


def _boundary(prompt: str, answers: list[tuple[int, int]], encode) -> bool:
    """True when the tokens of the prompt up to an answer's start are not a prefix of the tokens
    up to its end (a token spans the prompt and the answer)."""
    for start, end in answers:
        head, whole = encode(prompt[:start]), encode(prompt[:end])
        if whole[:len(head)] != head:
            return True
    return False


def _answer_spans(prompt: str, sep: str, close: str) -> list[tuple[int, int]]:
    spans, at = [], 0
    while True:
        s = prompt.find(sep, at)
        if s < 0:
            return spans
        e = prompt.find(close, s)
        spans.append((s + len(sep), e + len(close) if e >= 0 else len(prompt)))
        at = spans[-1][1]


def _llava(job: dict, tok, vw_conversation) -> dict:
    import copy
    import contextlib
    import io

    from llava.mm_utils import tokenizer_image_token
    from llava.train import train

    entry, template = job["entry"], job["template"]
    train.conversation_lib.default_conversation = train.conversation_lib.conv_templates[
        "plain" if template == "plain" else "v1"]  # train(): --version plain / v1
    has_image = "image" in entry
    data_args = train.DataArguments()
    data_args.is_multimodal, data_args.mm_use_im_start_end = True, False
    sources = copy.deepcopy([entry["conversations"]])  # LazySupervisedDataset.__getitem__
    if has_image:
        sources = train.preprocess_multimodal(sources, data_args)
    encode = (lambda s: tokenizer_image_token(s, tok)) if has_image else \
        (lambda s: tok(s).input_ids)
    if template == "mistral":
        source = sources[0]
        if source[0]["from"] != "human":  # as preprocess_v1 does
            source = source[1:]
        conv = vw_conversation.conv_templates["mistral"].copy()
        conv.messages = []
        for j, sentence in enumerate(source):
            role = {"human": conv.roles[0], "gpt": conv.roles[1]}[sentence["from"]]
            assert role == conv.roles[j % 2]
            conv.append_message(role, sentence["value"])
        prompt = conv.get_prompt()
        ids = encode(prompt)
        labels = [-100] * len(ids)
        spans = _answer_spans(prompt, "[/INST]", "</s>")
        for start, end in spans:
            a, b = len(encode(prompt[:start])), len(encode(prompt[:end]))
            labels[a:b] = ids[a:b]
        return {"input_ids": ids, "labels": labels, "mismatch": False,
                "boundary": _boundary(prompt, spans, encode), "prompt": prompt}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        data = train.preprocess(sources, tok, has_image=has_image)
    ids, labels = data["input_ids"][0].tolist(), data["labels"][0].tolist()
    boundary = False
    if template == "vicuna_v1":
        conv = train.conversation_lib.default_conversation.copy()
        source = sources[0] if sources[0][0]["from"] == "human" else sources[0][1:]
        conv.messages = []
        for sentence in source:
            conv.append_message({"human": conv.roles[0], "gpt": conv.roles[1]}[sentence["from"]],
                                sentence["value"])
        prompt = conv.get_prompt()
        boundary = _boundary(prompt, _answer_spans(prompt, " ASSISTANT:", "</s>"), encode)
    return {"input_ids": ids, "labels": labels, "boundary": boundary,
            "mismatch": "tokenization mismatch" in out.getvalue()}


def _main() -> None:
    import importlib.util

    jobs = json.loads(sys.stdin.read())
    vw_conversation = None
    if any(j["template"] == "mistral" for j in jobs):
        spec = importlib.util.spec_from_file_location("vw_conversation",
                                                      os.environ["VWLMM_CONVERSATION"])
        vw_conversation = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vw_conversation)
    tokenizers, results = {}, []
    for job in jobs:
        if job["tokenizer"] not in tokenizers:
            tokenizers[job["tokenizer"]] = _tokenizer(job["tokenizer"])
        try:
            results.append(_llava(job, tokenizers[job["tokenizer"]], vw_conversation))
        except Exception as exc:  # what LLaVA does with the record: it raises
            results.append({"error": f"{type(exc).__name__}: {exc}"[:300]})
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
