"""An independent plain-PyTorch VW-LMM for parity tests (no megatron, no project model code).

Stock transformers ``CLIPVisionModel`` + ``LlamaForCausalLM``, an ``nn.Sequential`` adapter and an
``nn.Linear`` VM head; splicing written LLaVA's way (loop over samples, cut at each placeholder)
and the losses written from the reference formulas of pengts/VW-LMM ``vw_llama.py`` /
``vw_pif_llama.py``: CE(shifted) + KLDivLoss(batchmean)(log_softmax(shifted MM logits),
softmax(VM logits)) over image positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceVWLMM(nn.Module):
    def __init__(self, vision_config, llm_config, pif: bool = False):
        from transformers import CLIPVisionModel, LlamaForCausalLM

        super().__init__()
        self.vision_tower = CLIPVisionModel(vision_config)
        self.llm = LlamaForCausalLM(llm_config)
        h, hv, vocab = llm_config.hidden_size, vision_config.hidden_size, llm_config.vocab_size
        self.mm_projector = nn.Sequential(nn.Linear(hv, h), nn.GELU(), nn.Linear(h, h))
        self.vm_head = nn.Linear(h, vocab, bias=False)
        self.pif = pif

    def encode_images(self, images):
        out = self.vision_tower(images, output_hidden_states=True)
        return self.mm_projector(out.hidden_states[-2][:, 1:])  # penultimate layer, no CLS

    def forward(self, input_ids_list, labels_list, images, image_token_id=-200):
        embed = self.llm.get_input_embeddings()
        feats = self.encode_images(images) if images.shape[0] else None
        vm_logits = self.vm_head(feats) if feats is not None else None
        if self.pif and feats is not None:
            feats = torch.einsum("npv,vh->nph", F.softmax(vm_logits, dim=-1), embed.weight)
        seqs, labs, vms, masks = [], [], [], []
        image_index = 0
        for ids, lab in zip(input_ids_list, labels_list):
            ids, lab = torch.as_tensor(ids), torch.as_tensor(lab)
            parts, part_labels, part_vm, part_mask = [], [], [], []
            start = 0
            for pos in torch.where(ids == image_token_id)[0].tolist():
                parts.append(embed(ids[start:pos]))
                part_labels.append(lab[start:pos])
                part_vm.append(torch.zeros(pos - start, embed.weight.shape[0]))
                part_mask.append(torch.zeros(pos - start, dtype=torch.bool))
                parts.append(feats[image_index])
                part_labels.append(torch.full((feats.shape[1],), -100))
                part_vm.append(vm_logits[image_index])
                part_mask.append(torch.ones(feats.shape[1], dtype=torch.bool))
                image_index += 1
                start = pos + 1
            parts.append(embed(ids[start:]))
            part_labels.append(lab[start:])
            part_vm.append(torch.zeros(len(ids) - start, embed.weight.shape[0]))
            part_mask.append(torch.zeros(len(ids) - start, dtype=torch.bool))
            seqs.append(torch.cat(parts))
            labs.append(torch.cat(part_labels))
            vms.append(torch.cat(part_vm))
            masks.append(torch.cat(part_mask))
        length = max(s.shape[0] for s in seqs)
        pad = lambda t, v: torch.cat([t, torch.full((length - t.shape[0], *t.shape[1:]), v,
                                                    dtype=t.dtype)])
        inputs = torch.stack([pad(s, 0.0) for s in seqs])
        labels = torch.stack([pad(lab, -100) for lab in labs])
        vm_all = torch.stack([pad(v, 0.0) for v in vms])
        image_mask = torch.stack([pad(m, False) for m in masks])
        logits = self.llm(inputs_embeds=inputs).logits

        shift_logits = logits[:, :-1]
        lm_loss = F.cross_entropy(shift_logits.reshape(-1, logits.shape[-1]),
                                  labels[:, 1:].reshape(-1), ignore_index=-100)
        shift_mask = image_mask[:, 1:]
        if shift_mask.any():
            kl = nn.KLDivLoss(reduction="batchmean")
            vm_loss = kl(F.log_softmax(shift_logits[shift_mask], dim=-1),
                         F.softmax(vm_all[:, 1:][shift_mask], dim=-1))
        else:
            vm_loss = logits.new_zeros(())
        return lm_loss, vm_loss, logits
