"""The VQA accuracy as the official VQA evaluation computes it, written from its rules and
independent of lmms-eval: the tests recompute lmms-eval's reported score from the answers it
logged.

Per question: answers lose newlines, tabs and outer spaces; when the ten annotators' answers
are not all the same, every answer and the model's are normalised (punctuation, then lower
case, number words to digits, articles dropped, contractions restored). The accuracy is the
mean over the ten leave-one-annotator-out subsets of min(1, matches among the other nine / 3).
"""

from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't "
    "couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't "
    "hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd "
    "hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've "
    "I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll "
    "let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've "
    "mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock "
    "oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
    "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll "
    "somebodys:somebody's someoned:someone'd someoned've:someone'd've "
    "someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd "
    "somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're "
    "theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
    "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've "
    "weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've "
    "whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've "
    "who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
    "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've "
    "youll:you'll youre:you're youve:you've").split())
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def strip_punctuation(text: str) -> str:
    """A mark next to a space (or any text with a digit-comma-digit) is deleted, otherwise it
    becomes a space; then periods not followed by a digit go, at most 32 of them (the official
    code passes ``re.UNICODE`` where ``re.sub`` takes its count)."""
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=re.UNICODE)


def normalise_words(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(answer: str, annotators: Sequence[str]) -> float:
    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    gts = [clean(a) for a in annotators]
    res = clean(answer)
    if len(set(gts)) > 1:
        gts = [normalise_words(strip_punctuation(a)) for a in gts]
        res = normalise_words(strip_punctuation(res))
    accs = [min(1.0, sum(g == res for j, g in enumerate(gts) if j != i) / 3)
            for i in range(len(gts))]
    return sum(accs) / len(accs)
