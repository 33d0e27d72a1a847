"""The test oracle: LLaVA-1.5's training-data preparation, ported from its published behaviour
and sharing no code with ``preprocessing/``.

Text (haotian-liu/LLaVA, llava/train/train.py, llava/mm_utils.py, llava/conversation.py):
``preprocess_multimodal`` (the turn holding ``<image>`` becomes ``<image>\\n`` + its stripped
text), ``conv_vicuna_v1`` / ``conv_llava_plain`` prompts, ``tokenizer_image_token`` (the prompt
cut at each ``<image>``, every chunk tokenized with BOS, the BOS of all but the first dropped),
``preprocess_plain`` and ``preprocess_v1`` (masking by counting tokens per round, the "-2", the
"tokenization mismatch" that masks a whole sample). The mistral prompt is VW-LMM's
(pengts/VW-LMM, visual_words/conversation.py, ``SeparatorStyle.MISTRAL``); VW-LMM published no
training code, so its labels follow ``preprocess_v1``'s round arithmetic with "[/INST]" as the
separator (its instruction ends at "]": only BOS is subtracted).

The tokenizer is LLaVA's slow ``LlamaTokenizer`` in legacy mode, emulated on the SentencePiece
model itself: the text is cut at special-token strings and every other segment is encoded by
SentencePiece (dummy prefix included); ``__call__`` adds BOS as ``tokenizer(text).input_ids``
does.

Images (llava/mm_utils.py ``expand2square``, llava/train/train.py): ``Image.open(...)
.convert("RGB")``, then for ``pad`` the image centred on a square of ``int(mean * 255)``, then
the CLIP image processor (transformers' PIL-backed CLIPImageProcessor: short side to 336
bicubic, centre crop, rescale, normalise).
"""

from __future__ import annotations

import io
from typing import List, Optional, Tuple

import numpy as np

IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE = -100
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class SlowLegacyTokenizer:
    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos, self.eos, self.unk = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad = self.unk  # LLaVA's v1 training: tokenizer.pad_token = tokenizer.unk_token
        self.specials = {self.sp.id_to_piece(i): i for i in (self.bos, self.eos, self.unk)}

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        while text:
            hits = [(text.find(s), s) for s in self.specials if s in text]
            if not hits:
                out += self.sp.encode(text)
                break
            at, special = min(hits)
            if at:
                out += self.sp.encode(text[:at])
            out.append(self.specials[special])
            text = text[at + len(special):]
        return out

    def __call__(self, text: str) -> List[int]:
        return [self.bos] + self.encode(text)


def tokenizer_image_token(prompt: str, tok: SlowLegacyTokenizer) -> List[int]:
    chunks = [tok(c) for c in prompt.split(IMAGE)]
    ids: List[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:  # the separator [IMAGE] * (offset + 1) loses its first element like every chunk
            ids += ([IMAGE_TOKEN_INDEX] * (offset + 1))[offset:]
        ids += chunk[offset:]
    return ids


def preprocess_multimodal(turns: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    out = []
    for role, value in turns:
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append((role, value))
    return out


def preprocess_plain(turns, tok) -> Tuple[List[int], List[int]]:
    assert len(turns) == 2 and IMAGE in turns[0][1]
    ids = tokenizer_image_token(IMAGE + turns[1][1] + "\n", tok)
    labels = list(ids)
    masked = len(tokenizer_image_token(IMAGE, tok))
    labels[:masked] = [IGNORE] * masked
    return ids, labels


def v1_prompt(turns) -> str:
    seps = [" ", "</s>"]
    out = V1_SYSTEM + seps[0]
    for i, (role, value) in enumerate(turns):
        out += {"human": "USER", "gpt": "ASSISTANT"}[role] + ": " + value + seps[i % 2]
    return out


def mistral_prompt(turns) -> str:
    out = ""
    for i, (_, value) in enumerate(turns):
        out += f"[INST] {value} [/INST]" if i % 2 == 0 else value + "</s>"
    return out


def _mask_rounds(prompt: str, tok, has_image: bool, sep: str, instruction_extra: int):
    """preprocess_v1's masking; returns (ids, labels, mismatch)."""
    encode = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok
    ids = encode(prompt)
    labels = list(ids)
    total_len = sum(1 for t in ids if t != tok.pad)
    cur = 1
    labels[:cur] = [IGNORE] * cur
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0])) - 1 - instruction_extra
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    mismatch = cur != total_len
    if mismatch:
        labels = [IGNORE] * len(ids)
    return ids, labels, mismatch


def preprocess_v1(turns, tok, has_image: bool):
    # The instruction ends with "ASSISTANT: ": its BOS and trailing "▁" are subtracted.
    return _mask_rounds(v1_prompt(turns), tok, has_image, " ASSISTANT: ", 1)


def preprocess_mistral(turns, tok, has_image: bool):
    return _mask_rounds(mistral_prompt(turns), tok, has_image, "[/INST]", 0)


def boundary_merged(turns, tok, has_image: bool, template: str) -> bool:
    """True when a round's instruction, tokenized alone, is not a prefix of the round's tokens
    (a token spans the end of the instruction and the start of the answer): LLaVA's count then
    masks part of the answer or supervises part of the prompt without noticing."""
    prompt = v1_prompt(turns) if template == "vicuna_v1" else mistral_prompt(turns)
    sep, extra = (" ASSISTANT: ", 1) if template == "vicuna_v1" else ("[/INST]", 0)
    encode = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok
    for rou in prompt.split("</s>")[:-1]:
        instruction = encode(rou.split(sep)[0] + sep)
        instruction = instruction[:len(instruction) - extra]
        if encode(rou)[:len(instruction)] != instruction:
            return True
    return False


def llava_sample(entry: dict, template: str, tok) -> Optional[Tuple[List[int], List[int], bool]]:
    """(input_ids, labels, mismatch) LLaVA-1.5 trains on for one LLaVA-JSON record."""
    turns = [(t["from"], t["value"]) for t in entry["conversations"]]
    has_image = "image" in entry
    if has_image:
        turns = preprocess_multimodal(turns)
    if template == "plain":
        turns = [(turns[0][0], IMAGE), turns[1]]  # preprocess_plain replaces the human turn
        return (*preprocess_plain(turns, tok), False)
    if template == "vicuna_v1":
        return preprocess_v1(turns, tok, has_image)
    return preprocess_mistral(turns, tok, has_image)


# -- images ---------------------------------------------------------------------------------------

def expand2square(im, background):
    from PIL import Image

    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), background)
    out.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def clip_processor(size: int = 336):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})


def llava_pixels(data: bytes, mode: str, processor) -> np.ndarray:
    """LLaVA's [3, 336, 336] float32 pixel_values of one image file (``pad`` or ``square``)."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    if mode == "pad":
        im = expand2square(im, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(im, return_tensors="np")["pixel_values"][0]
