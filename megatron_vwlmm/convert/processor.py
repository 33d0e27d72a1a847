"""The processor saved beside a llava-hf export: tokenizer with ``<image>``, image processor in
LLaVA's pad mode with the encoder kind's normalisation, chat template matching the training
templates of ``preprocessing``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_vwlmm.convert.errors import VocabMismatchError
from megatron_vwlmm.model.config import VWLMMConfig
from megatron_vwlmm.vision import get_encoder_kind

IMAGE_TOKEN = "<image>"

# Jinja without whitespace trimming: the templates are single-line, every space is meant.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)
# preprocessing/templates.py renderings:
#   vicuna_v1: <s>SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>
#   mistral:   <s>[INST] <image>\nq [/INST]a</s>[INST] q2 [/INST]a2</s>
CHAT_TEMPLATES = {
    "vicuna_v1": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first %}A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. {% endif %}USER: " + _CONTENT + " "
        "{% elif message['role'] == 'assistant' %}ASSISTANT: " + _CONTENT + "{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
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
    return tokenizer, image_token_id


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


def find_tokenizer_dir(*candidates: Optional[str]) -> Optional[Path]:
    for folder in candidates:
        if folder and any((Path(folder) / n).is_file()
                          for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return Path(folder)
    return None
