"""The processor saved beside a llava-hf export: tokenizer with ``<image>``, image processor in
LLaVA's pad mode with the encoder kind's normalisation, chat template matching the training
templates of ``preprocessing``.

The prompt a user writes for stock ``processor(images=..., text=prompt)`` must encode to the
ids training saw. ``preprocessing/templates.py`` puts BOS first and tokenizes the text pieces
between special tokens (BOS, ``<image>``, EOS) on their own, as LLaVA's slow tokenizer does:
the piece after BOS or ``<image>`` starts with its own SentencePiece dummy prefix, and so does
the piece after ``</s>`` unless the folder says ``"legacy": false``
(``preprocessing/legacy_tokenizer.py``). ``encode_as_training`` gives the exported tokenizer
BOS (it adds it itself, as Llama / Vicuna / LLaVA-1.5 tokenizers do, so the chat templates
carry no ``bos_token``) and, for a Metaspace tokenizer, a prefix on every piece rather than
only the first. The prompts the README documents ("Hugging Face conversion": ``<image>`` for
``plain``, the chat template's rendering for the others) then reproduce the training ids up to
the answer, BOS included; later rounds too, except the "▁" after ``</s>`` of a non-legacy
folder, which no tokenizer setting can drop while keeping the one after ``<image>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_vwlmm.convert.errors import VocabMismatchError
from megatron_vwlmm.model.config import VWLMMConfig
from vwlmm_data.encoders import get_encoder_kind

IMAGE_TOKEN = "<image>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Jinja without whitespace trimming: the templates are single-line, every space is meant.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)
# preprocessing/templates.py renderings, BOS added by the tokenizer:
#   plain:     <s><image>caption\n            (the user turn is its images only)
#   vicuna_v1: <s>SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>
#   mistral:   <s>[INST] <image>\nq [/INST]a</s>[INST] q2 [/INST]a2</s>
CHAT_TEMPLATES = {
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if message['content'] is not string %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
        "{% elif message['role'] == 'assistant' %}" + _CONTENT + "\n"
        "{% endif %}{% endfor %}"
    ),
    "vicuna_v1": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first %}A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. {% endif %}USER: " + _CONTENT + " "
        "{% elif message['role'] == 'assistant' %}ASSISTANT: " + _CONTENT + "{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "mistral": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] " + _CONTENT + " [/INST]"
        "{% elif message['role'] == 'assistant' %}" + _CONTENT + "{{ eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}


def load_tokenizer_with_image_token(tokenizer_dir: str | Path, vocab_size: int):
    """(tokenizer, image token id): ``<image>`` added as a special token when absent. Its id
    must be ``<= vocab_size`` (== means the export appends one embedding row)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > vocab_size:
        raise VocabMismatchError(
            f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's "
            f"vocab_size is {vocab_size}; it is not this model's tokenizer")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id > vocab_size:
        raise VocabMismatchError(
            f"{tokenizer_dir}: {IMAGE_TOKEN} has id {image_token_id}, beyond vocab_size "
            f"{vocab_size} + 1 (one image-token row is appended at most)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    encode_as_training(tokenizer)
    return tokenizer, image_token_id


def encode_as_training(tokenizer) -> None:
    """Make ``tokenizer`` encode a prompt as preprocessing encoded training text (module
    docstring): BOS first, and (Metaspace tokenizers) a dummy prefix at the start of every piece
    between special tokens. Both survive ``save_pretrained``: the BOS rule lives in
    ``tokenizer.json``'s post processor, and Llama tokenizers, which rebuild their pre-tokenizer
    on load, get ``legacy=True`` (transformers' name for prefixing every piece)."""
    from tokenizers.pre_tokenizers import Metaspace

    if tokenizer.bos_token_id is not None:
        tokenizer.add_bos_token = True  # the setter rewrites the backend's post processor
        if tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]:
            raise ValueError(f"{tokenizer.name_or_path}: the tokenizer cannot be made to add "
                             f"its BOS token {tokenizer.bos_token!r}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, Metaspace) and pre.prepend_scheme == "first":
        backend.pre_tokenizer = Metaspace(replacement=pre.replacement, prepend_scheme="always",
                                          split=pre.split)
        if hasattr(tokenizer, "legacy"):
            tokenizer.legacy = True
            tokenizer.init_kwargs["legacy"] = True  # what save_pretrained writes


def build_processor(tokenizer, config: VWLMMConfig, template: str):
    """A ``LlavaProcessor``: CLIP-style preprocessing with LLaVA's pad-to-square (``do_pad``,
    mean colour background) and the encoder kind's mean/std; ``num_additional_image_tokens``
    is the kind's class token (CLIP: 1, which the model drops; SigLIP: 0), so one ``<image>``
    expands to ``num_patches`` tokens."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from megatron_vwlmm.vision.hf_formats import hf_format

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template: {template!r} is not one of {sorted(CHAT_TEMPLATES)}")
    size = config.vision.image_size
    kind = get_encoder_kind(config.vision.kind)
    image_processor = LlavaImageProcessorPil(
        do_pad=True, do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(kind.image_mean), image_std=list(kind.image_std),
        do_convert_rgb=True)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision.patch_size,
        vision_feature_select_strategy=hf_format(kind.name).llava_feature_strategy,
        chat_template=CHAT_TEMPLATES[template], image_token=IMAGE_TOKEN,
        num_additional_image_tokens=kind.num_class_tokens)


def default_template(architecture: str) -> str:
    return "mistral" if architecture == "mistral" else "vicuna_v1"


def is_tokenizer_dir(folder: Optional[str | Path]) -> bool:
    return bool(folder) and any((Path(folder) / n).is_file() for n in TOKENIZER_FILES)


def find_tokenizer_dir(*candidates: Optional[str]) -> Optional[Path]:
    for folder in candidates:
        if is_tokenizer_dir(folder):
            return Path(folder)
    return None


def require_tokenizer_dir(folder: str | Path) -> Path:
    """``folder`` as a tokenizer folder, or an error naming it: a tokenizer asked for by name
    is never silently left out of an export."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {folder}: no such folder; pass the Hugging Face "
                                "tokenizer folder the data was preprocessed with")
    if not is_tokenizer_dir(path):
        raise ValueError(f"tokenizer {folder}: holds none of {', '.join(TOKENIZER_FILES)}; pass "
                         "the Hugging Face tokenizer folder the data was preprocessed with")
    return path
