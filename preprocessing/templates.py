"""Conversation templates (``plain``, ``vicuna_v1``, ``mistral``) and label masking.

A conversation is rendered into *pieces*: text (with character spans marking the assistant's
words), image placeholders, BOS and EOS. Each text piece is tokenized on its own with offsets,
and a token is supervised iff it covers assistant characters. LLaVA instead tokenizes prompt
prefixes separately and subtracts lengths, which silently masks the whole sample when the two
tokenizations disagree (its "tokenization mismatch" warning). Here every sample is verified:
a token that mixes assistant and prompt characters, or supervised tokens that do not decode to
exactly the assistant text, rejects the sample with reason ``tokenization_mismatch``.

Renderings (``<s>``/``</s>`` are the BOS/EOS ids, ``<image>`` the placeholder id):
- plain (LLaVA pretraining): ``<s><image>...caption</s>``; caption and EOS supervised.
- vicuna_v1: ``<s>SYSTEM USER: <image>\\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>``
- mistral: ``<s>[INST] <image>\\nq [/INST] a</s>[INST] q2 [/INST] a2</s>``
In the chat templates each answer and its EOS are supervised; everything else is IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from preprocessing.schema import IGNORE_INDEX, IMAGE_TOKEN_ID

IMAGE_TAG = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(ValueError):
    """A conversation that cannot be rendered or masked; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "gpt"
    text: str


@dataclass
class _Text:
    text: str = ""
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, turn index)


@dataclass
class _Special:
    kind: str  # "bos" | "eos" | "image"
    turn: int | None = None  # answer index when supervised (EOS of an answer)


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    num_images: int


class _Renderer:
    def __init__(self) -> None:
        self.pieces: list[_Text | _Special] = []

    def _text(self) -> _Text:
        if not self.pieces or not isinstance(self.pieces[-1], _Text):
            self.pieces.append(_Text())
        return self.pieces[-1]

    def text(self, s: str, answer: int | None = None) -> None:
        """Append prompt text, or the words of answer number ``answer`` (supervised)."""
        for i, chunk in enumerate(s.split(IMAGE_TAG)):
            if i:
                self.pieces.append(_Special("image"))
            if chunk:
                piece = self._text()
                if answer is not None:
                    piece.spans.append((len(piece.text), len(piece.text) + len(chunk), answer))
                piece.text += chunk

    def special(self, kind: str, answer: int | None = None) -> None:
        self.pieces.append(_Special(kind, answer))


def _check_turns(turns: list[Turn]) -> None:
    if not turns or len(turns) % 2:
        raise TemplateError("bad_record", f"expected human/gpt pairs, got {len(turns)} turns")
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t.role != want:
            raise TemplateError("bad_record", f"turn {i} is from {t.role!r}, expected {want!r}")
        if t.role == "gpt" and IMAGE_TAG in t.text:
            raise TemplateError("image_tag_mismatch", f"answer turn {i} contains {IMAGE_TAG}")
        if t.role == "gpt" and not t.text.strip():
            raise TemplateError("bad_record", f"answer turn {i} is empty")


def render(template: str, turns: list[Turn]) -> _Renderer:
    _check_turns(turns)
    r = _Renderer()
    r.special("bos")
    if template == "plain":
        # LLaVA's preprocess_plain: the human turn is reduced to its image(s), the first answer is
        # the caption. Multi-turn data has no place in this template.
        if len(turns) != 2:
            raise TemplateError("template_incompatible", f"plain needs 1 exchange, got {len(turns) // 2}")
        r.text(IMAGE_TAG * turns[0].text.count(IMAGE_TAG))
        r.text(turns[1].text.strip(), answer=0)
        r.special("eos", answer=0)
        return r
    for k in range(0, len(turns), 2):
        question, answer = turns[k].text.strip(), turns[k + 1].text.strip()
        if template == "vicuna_v1":
            r.text((VICUNA_SYSTEM + " " if k == 0 else "") + "USER: " + question + " ASSISTANT: ")
        elif template == "mistral":
            r.text("[INST] " + question + " [/INST] ")
        else:
            raise TemplateError("template_incompatible", f"unknown template {template!r}")
        r.text(answer, answer=k // 2)
        r.special("eos", answer=k // 2)
    return r


def tokenize(template: str, turns: list[Turn], tokenizer) -> Tokenized:
    """Render + tokenize + mask + verify; raises TemplateError with the reject reason."""
    r = render(template, turns)
    ids: list[int] = []
    labels: list[int] = []
    answer_of: list[int | None] = []
    for piece in r.pieces:
        if isinstance(piece, _Special):
            tid = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                   "image": IMAGE_TOKEN_ID}[piece.kind]
            ids.append(tid)
            labels.append(tid if piece.turn is not None else IGNORE_INDEX)
            answer_of.append(piece.turn)
            continue
        enc = tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            owner = _owner(piece, start, end)
            ids.append(tid)
            labels.append(tid if owner is not None else IGNORE_INDEX)
            answer_of.append(owner)
    _verify(turns, template, ids, answer_of, tokenizer)
    n_img = sum(1 for p in r.pieces if isinstance(p, _Special) and p.kind == "image")
    return Tokenized(np.asarray(ids, np.int32), np.asarray(labels, np.int32), n_img)


def _owner(piece: _Text, start: int, end: int) -> int | None:
    """The answer a token belongs to, None for prompt tokens; mixed tokens raise."""
    for s, e, turn in piece.spans:
        if start < e and end > s:  # overlaps the answer
            outside = piece.text[start:max(start, s)] + piece.text[min(end, e):end]
            if outside.strip():
                raise TemplateError(
                    "tokenization_mismatch",
                    f"token {piece.text[start:end]!r} spans prompt and answer {turn} text",
                )
            return turn
    return None


def _verify(turns, template, ids, answer_of, tokenizer) -> None:
    answers = [t.text.strip() for t in turns if t.role == "gpt"]
    if template == "plain":
        answers = answers[:1]
    for k, want in enumerate(answers):
        toks = [i for i, a in zip(ids, answer_of) if a == k]
        if not toks or toks[-1] != tokenizer.eos_token_id:
            raise TemplateError("tokenization_mismatch", f"answer {k} is not closed by EOS")
        got = tokenizer.decode(toks[:-1], clean_up_tokenization_spaces=False)
        if got != want:
            raise TemplateError(
                "tokenization_mismatch", f"answer {k} decodes to {got[:60]!r}, expected {want[:60]!r}"
            )
