"""``VWLMMForConditionalGeneration``: stock llava-hf plus the VM head (visual words) and PIF.

A llava-hf export loads in stock ``LlavaForConditionalGeneration`` (the only unexpected key is
``vm_head.weight``); this subclass also loads the VM head and adds what VW-LMM needs:

- ``visual_word_logits(pixel_values)``: the VM head applied to the adapter outputs, [N, P, V]
  (paper Sec. 3: z_t = W_vm x_t over the LLM's text vocabulary);
- PIF (config ``pif=True``): the decoder sees ``softmax(W_vm x) @ E`` at image positions instead
  of ``x`` (paper Sec. 3.3), applied as a hook on the multimodal projector's output.

The text vocabulary is ``config.visual_word_vocab_size`` (the export appends ``<image>`` after
it); MM logits beyond it are the added token's and are not part of the visual-word KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration


class VWLMMForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        vocab = getattr(config, "visual_word_vocab_size", None) or config.text_config.vocab_size
        self.vm_head = nn.Linear(config.text_config.hidden_size, vocab, bias=False)
        self._pif_hook = None
        if getattr(config, "pif", False):
            self._pif_hook = self.model.multi_modal_projector.register_forward_hook(
                self._pseudo_image_features)
        self.post_init()

    @property
    def text_vocab_size(self) -> int:
        return self.vm_head.out_features

    def _pseudo_image_features(self, module, inputs, features):
        probs = F.softmax(self.vm_head(features).float(), dim=-1)
        embeddings = self.get_input_embeddings().weight[: self.text_vocab_size]
        return (probs @ embeddings.float()).to(features.dtype)

    def adapter_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projector outputs x (before PIF), [N, P, h]."""
        vision = self.model.vision_tower(pixel_values, output_hidden_states=True)
        selected = vision.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # CLIP's class token; SigLIP exports keep all ("full")
        # The projector's layers called directly: the PIF hook must not apply here.
        p = self.model.multi_modal_projector
        return p.linear_2(p.act(p.linear_1(selected)))

    def visual_word_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-patch VM-head logits over the text vocabulary, [N, P, V]."""
        return self.vm_head(self.adapter_features(pixel_values))
