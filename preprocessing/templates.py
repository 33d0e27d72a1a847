"""Conversation templates (``plain``, ``vicuna_v1``, ``mistral``) and label masking, token for
token as LLaVA-1.5 builds its training data.

Renderings (``<s>``/``</s>`` are the BOS/EOS ids, ``<image>`` the placeholder, ``[...]`` marks
the supervised part; turn texts are used as written):
- plain, LLaVA's ``preprocess_plain``: ``<s><image>[caption\\n]``; with ``plain_eos``
  (not LLaVA's) ``<s><image>[caption</s>]``.
- vicuna_v1, LLaVA's ``conv_vicuna_v1`` + ``preprocess_v1``:
  ``<s>SYSTEM USER: q ASSISTANT:[ a</s>]USER: q2 ASSISTANT:[ a2</s>]``
- mistral, VW-LMM's ``conversation.py`` (MISTRAL style, also Mistral-Instruct's own format):
  ``<s>[INST] q [/INST][a</s>][INST] q2 [/INST][a2</s>]``

LLaVA tokenizes a conversation in segments (split at each ``<image>`` and special token; with a
``legacy`` tokenizer every segment has its own "▁" dummy prefix, otherwise the segment after a
special token has none: ``preprocessing.legacy_tokenizer``) and masks by counting: per round,
the instruction's token count minus 2 (its BOS and its trailing "▁"; one less again per later
round when not ``legacy``). Here the conversation is rendered into the same segments
(*pieces*), each piece is tokenized with character offsets, and a token is supervised iff it
covers characters of an answer span, which gives LLaVA's labels for either ``legacy`` value. A
vicuna answer's span starts at the space before it, which is what LLaVA's "-2" leaves
supervised: the lone "▁" before an answer starting with a digit, CJK text or an emoji is a
label, as in LLaVA. The mistral template has no published training code: its labels are, by
the same rule, the tokens of each answer and its ``</s>``.

A record without images (``image_tags=False``) keeps ``<image>`` as text, as LLaVA tokenizes a
text-only record.

Every sample is verified. LLaVA silently masks a whole sample when its counts disagree (its
"tokenization mismatch" warning); here such a sample is rejected as ``tokenization_mismatch``:
a token mixing prompt and answer characters (mistral's "]." when an answer starts with "."),
supervised tokens that do not decode back to the answer, or a turn containing the separator
LLaVA splits rounds at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID

IMAGE_TAG = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Where LLaVA's preprocess_v1 cuts a round into instruction and answer (the mistral template
# has no published training code; the same rule is applied with its own separator).
ANSWER_SEPARATORS = {"vicuna_v1": " ASSISTANT: ", "mistral": "[/INST]"}


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
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, answer index)


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
    def __init__(self, image_tags: bool = True) -> None:
        self.image_tags = image_tags
        self.pieces: list[_Text | _Special] = []
        self.answers: list[str] = []  # the supervised text of each answer (EOS excluded)

    def _text(self) -> _Text:
        if not self.pieces or not isinstance(self.pieces[-1], _Text):
            self.pieces.append(_Text())
        return self.pieces[-1]

    def text(self, s: str) -> None:
        """Append prompt text; each ``<image>`` becomes a placeholder between pieces (when the
        record has images)."""
        for i, chunk in enumerate(s.split(IMAGE_TAG) if self.image_tags else [s]):
            if i:
                self.pieces.append(_Special("image"))
            if chunk:
                self._text().text += chunk

    def answer(self, s: str) -> None:
        """Append the supervised text of the next answer (``<image>`` in it only as text)."""
        piece = self._text()
        piece.spans.append((len(piece.text), len(piece.text) + len(s), len(self.answers)))
        piece.text += s
        self.answers.append(s)

    def special(self, kind: str, answer: int | None = None) -> None:
        self.pieces.append(_Special(kind, answer))


def _check_turns(turns: list[Turn], image_tags: bool) -> None:
    if not turns or len(turns) % 2:
        raise TemplateError("bad_record", f"expected human/gpt pairs, got {len(turns)} turns")
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t.role != want:
            raise TemplateError("bad_record", f"turn {i} is from {t.role!r}, expected {want!r}")
        if image_tags and t.role == "gpt" and IMAGE_TAG in t.text:
            raise TemplateError("image_tag_mismatch", f"answer turn {i} contains {IMAGE_TAG}")
        if not t.text.strip():
            # LLaVA renders an empty turn as "ROLE:" with no separator, which breaks its own
            # round split: the sample ends up fully masked. Rejected here, with the reason.
            raise TemplateError("bad_record", f"{'answer' if t.role == 'gpt' else 'human'} "
                                              f"turn {i} is empty")


def render(template: str, turns: list[Turn], plain_eos: bool = False,
           image_tags: bool = True) -> _Renderer:
    _check_turns(turns, image_tags)
    r = _Renderer(image_tags)
    r.special("bos")
    if template == "plain":
        # preprocess_plain: the human turn is replaced by its image(s); the caption and LLaVA's
        # "\n" separator are the target, without EOS. Multi-turn data has no place here.
        if len(turns) != 2:
            raise TemplateError("template_incompatible", f"plain needs 1 exchange, got {len(turns) // 2}")
        r.text(IMAGE_TAG * turns[0].text.count(IMAGE_TAG))
        if plain_eos:
            r.answer(turns[1].text)
            r.special("eos", 0)
        else:
            r.answer(turns[1].text + "\n")
        return r
    if template not in ANSWER_SEPARATORS:
        raise TemplateError("template_incompatible", f"unknown template {template!r}")
    separator = ANSWER_SEPARATORS[template]
    for k in range(0, len(turns), 2):
        question, answer = turns[k].text, turns[k + 1].text
        if template == "vicuna_v1":
            prompt = (VICUNA_SYSTEM + " " if k == 0 else "") + "USER: " + question + " ASSISTANT:"
            supervised = " " + answer
        else:
            prompt, supervised = "[INST] " + question + " [/INST]", answer
        if (prompt + supervised).count(separator) != 1:
            raise TemplateError(
                "tokenization_mismatch", f"turn {k} or {k + 1} contains {separator!r}, where "
                "LLaVA splits a round into instruction and answer (it masks such samples whole)")
        r.text(prompt)
        r.answer(supervised)
        r.special("eos", k // 2)
    return r


def tokenize(template: str, turns: list[Turn], tokenizer, plain_eos: bool = False,
             image_tags: bool = True) -> Tokenized:
    """Render + tokenize + mask + verify; raises TemplateError with the reject reason.

    ``tokenizer``: a fast HF tokenizer or ``legacy_tokenizer.SentencePieceSegments`` (text
    segments -> ids + character offsets, ``decode``, ``bos_token_id``/``eos_token_id``).
    ``image_tags``: whether ``<image>`` is an image placeholder (False: a text-only record)."""
    for i, t in enumerate(turns):
        special = next((s for s in getattr(tokenizer, "all_special_tokens", ()) if s in t.text), None)
        if special is not None:
            # LLaVA's slow tokenizer would turn the text into a special id ("</s>" also splits
            # its rounds and masks the sample whole).
            raise TemplateError("special_token_in_text", f"turn {i} contains {special!r}")
    r = render(template, turns, plain_eos, image_tags)
    # False for a non-legacy SentencePiece tokenizer: no prefix on the text after </s>.
    prefix_after_special = getattr(tokenizer, "prefix_after_special", True)
    ids: list[int] = []
    labels: list[int] = []
    answer_of: list[int | None] = []
    for n, piece in enumerate(r.pieces):
        if isinstance(piece, _Special):
            tid = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                   "image": IMAGE_TOKEN_ID}[piece.kind]
            ids.append(tid)
            labels.append(tid if piece.turn is not None else IGNORE_INDEX)
            answer_of.append(piece.turn)
            continue
        after = n > 0 and isinstance(r.pieces[n - 1], _Special) and r.pieces[n - 1].kind == "eos"
        extra = {} if prefix_after_special or not after else {"after_special": True}
        enc = tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True, **extra)
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            owner = _owner(piece, start, end)
            ids.append(tid)
            labels.append(tid if owner is not None else IGNORE_INDEX)
            answer_of.append(owner)
    _verify(r, ids, answer_of, tokenizer, closed_by_eos=template != "plain" or plain_eos)
    n_img = sum(1 for p in r.pieces if isinstance(p, _Special) and p.kind == "image")
    return Tokenized(np.asarray(ids, np.int32), np.asarray(labels, np.int32), n_img)


def _owner(piece: _Text, start: int, end: int) -> int | None:
    """The answer a token belongs to, None for prompt tokens; mixed tokens raise.

    A token without characters of its own (the dummy prefix, a byte-fallback piece) belongs
    with the character at its offset."""
    if start == end:
        start, end = (start, start + 1) if start < len(piece.text) else (start - 1, start)
    for s, e, turn in piece.spans:
        if start < e and end > s:  # overlaps the answer
            if start < s or end > e:
                raise TemplateError(
                    "tokenization_mismatch",
                    f"token {piece.text[start:end]!r} spans prompt and answer {turn} text",
                )
            return turn
    return None


def _verify(r: _Renderer, ids, answer_of, tokenizer, closed_by_eos: bool) -> None:
    for k, want in enumerate(r.answers):
        toks = [i for i, a in zip(ids, answer_of) if a == k]
        if closed_by_eos:
            if not toks or toks[-1] != tokenizer.eos_token_id:
                raise TemplateError("tokenization_mismatch", f"answer {k} is not closed by EOS")
            toks = toks[:-1]
        got = tokenizer.decode(toks, clean_up_tokenization_spaces=False)
        # Decoding drops the space that starts the first token ("▁1" -> "1"): the separator
        # space of a vicuna answer, or a dummy prefix (which is no character of the text).
        if got != want and not (want.startswith(" ") and got == want[1:]):
            raise TemplateError(
                "tokenization_mismatch", f"answer {k} decodes to {got[:60]!r}, expected {want[:60]!r}"
            )
