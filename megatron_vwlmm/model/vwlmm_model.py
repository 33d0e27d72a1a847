"""VW-LMM on megatron-core: ViT (CLIP or SigLIP) -> mlp2x_gelu adapter -> Llama decoder, plus
the VM head.

Paper (arXiv 2403.07720) Sec. 3: the decoder's LM head ("MM head") is trained with next-token
cross-entropy on text and, at every image position t, with KL(visual word of patch t || the
model's next-token distribution at t-1), where the visual word is softmax(VM head(x_t)) over the
LLM vocabulary and x_t is the decoder's *input* embedding at t. PIF replaces x_t by
softmax(VM head(x_t)) @ E.

Pipeline parallelism (``docs/ARCHITECTURE.md`` section 3): the KL needs the VM logits on the last
stage, but the image features are born on the first. The last stage therefore also runs the
frozen vision encoder and holds a copy of the adapter (and, in PIF mode, the first stage holds a
copy of the VM head); the copies' gradients are summed over the embedding group by
``megatron_vwlmm.parallel.stage_replicas.finalize_model_grads``, exactly as megatron ties input
and output embeddings, so both copies take identical steps and the result equals PP=1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_vwlmm.losses import visual_word_kl
from megatron_vwlmm.model.config import (
    IGNORE_INDEX,
    RuntimeOptions,
    VWLMMConfig,
    adapter_transformer_config,
    decoder_transformer_config,
    vision_transformer_config,
)
from megatron_vwlmm.model.packing import PackedSequence, document_positions, next_token_targets
from megatron_vwlmm.model.pseudo_image_features import pseudo_image_features
from megatron_vwlmm.model.specs import (
    decoder_block_spec,
    mlp_spec,
    resolve_impl,
    vision_layer_spec,
    vision_norm_impl,
    without_sequence_parallel,
)
from megatron_vwlmm.model.splicing import scatter_image_features, visual_word_positions
from megatron_vwlmm.parallel.stage_replicas import mark_stage_replicated
from megatron_vwlmm.vision.towers import get_tower

# Order of the per-micro-batch loss statistics the last stage returns (one tensor, so that
# megatron's schedules can carry it like any output tensor).
LM_SUM, LM_COUNT, VM_SUM, VM_COUNT = range(4)


class VWLMMModel(MegatronModule):
    """One pipeline chunk of VW-LMM; ``pre_process``/``post_process`` say what it owns."""

    def __init__(
        self,
        config: VWLMMConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        runtime: Optional[RuntimeOptions] = None,
    ) -> None:
        impl = resolve_impl(config)
        decoder_config = decoder_transformer_config(config, runtime)
        super().__init__(config=decoder_config)
        self.vwlmm_config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        d, v = config.decoder, config.vision

        self.language_model = GPTModel(
            config=decoder_config,
            transformer_layer_spec=decoder_block_spec(impl, config.attention_backend,
                                                      decoder_config, vp_stage),
            vocab_size=d.vocab_size,
            max_sequence_length=d.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(d.rotary_base) if float(d.rotary_base).is_integer() else d.rotary_base,
            vp_stage=vp_stage,
            # Under sequence parallelism the embedded tokens stay whole until the image
            # features are spliced in; ``forward`` scatters the spliced sequence.
            scatter_embedding_sequence_parallel=False,
        )

        self.needs_image_features = pre_process or post_process
        self.has_vm_head = post_process or (config.pif and pre_process)
        self.vision_model = self.adapter = self.vm_head = None
        self.tower = get_tower(v.kind)
        if self.needs_image_features:
            self.vision_model = self.tower.build(
                v,
                vision_transformer_config(config, runtime),
                vision_layer_spec(impl, config.attention_backend),
                norm_impl=vision_norm_impl(impl),
            )
            self.adapter = MultimodalProjector(
                adapter_transformer_config(config),
                mlp_spec(impl).submodules,
                projector_type="mlp",
                input_size=v.hidden_size,
            )
        if self.has_vm_head:
            self.vm_head = tensor_parallel.ColumnParallelLinear(
                d.hidden_size,
                d.vocab_size,
                # It reads the image features, which are never split over the sequence.
                config=without_sequence_parallel(decoder_config),
                init_method=decoder_config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=True,
            )
        if config.bf16:
            # As megatron's Float16Module: every parameter in bf16 (torch norms and the patch
            # conv are created in fp32); the optimizer keeps fp32 main weights.
            self.bfloat16()
        self._apply_freezing()
        self._mark_stage_replicas()

    # -- construction helpers --------------------------------------------------------------

    def _apply_freezing(self) -> None:
        c = self.vwlmm_config
        frozen = {
            "vision_model": c.freeze_vision,
            "adapter": c.freeze_adapter,
            "language_model": c.freeze_decoder,
            "vm_head": c.freeze_vm_head,
        }
        for name, freeze in frozen.items():
            module = getattr(self, name)
            if module is not None and freeze:
                for param in module.parameters():
                    param.requires_grad_(False)

    def _mark_stage_replicas(self) -> None:
        """Flag modules that live on both the first and the last pipeline stage."""
        self._secondary_prefixes: tuple[str, ...] = ()
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return
        replicated = {"vision_model": self.post_process and not self.pre_process,
                      "adapter": self.post_process and not self.pre_process}
        if self.vwlmm_config.pif:
            replicated["vm_head"] = self.pre_process and not self.post_process
        for name, secondary in replicated.items():
            module = getattr(self, name)
            if module is not None:
                mark_stage_replicated(module, secondary=secondary)
        self._secondary_prefixes = tuple(
            f"{name}." for name, secondary in replicated.items()
            if secondary and getattr(self, name) is not None
        )

    # -- megatron module protocol ----------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's sharded state, with the secondary stage copies marked as replicas.

        A copy (e.g. the last stage's adapter) keeps the same key and shard as the primary, so
        any layout loads it, but only the primary writes it.
        """
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        secondary = tuple(prefix + p for p in self._secondary_prefixes)
        for name, entry in state.items():
            if secondary and name.startswith(secondary) and hasattr(entry, "replica_id"):
                rid = entry.replica_id  # parameters and extra states (ShardedObjects) alike
                entry.replica_id = (1, *rid[1:]) if isinstance(rid, tuple) else rid + 1
        return state

    # -- forward -----------------------------------------------------------------------------

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the adapter reads: the encoder's feature-layer hidden states of the patches
        (class token dropped), [num_images, num_patches, d_vis]."""
        grad_context = torch.no_grad() if self.vwlmm_config.freeze_vision else contextlib.nullcontext()
        with grad_context:
            return self.tower.patch_features(self.vision_model, images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Adapter outputs ``v`` of all patches, [num_images * num_patches, h], batch-major."""
        patch_features = self.patch_features(images)
        features = self.adapter(patch_features.transpose(0, 1).contiguous())  # [P, N, h]
        return features.transpose(0, 1).reshape(-1, features.shape[-1])

    def visual_word_logits(self, features: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the VM head's logits, [num_positions, V/tp]."""
        logits, _ = self.vm_head(features)
        return logits

    def forward(
        self,
        tokens: torch.Tensor,
        image_token_mask: torch.Tensor,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        packing: Optional[PackedSequence] = None,
    ) -> torch.Tensor:
        """Pre/middle stages return the hidden states for the next stage. The last stage returns
        ``[lm_loss_sum, lm_count, vm_loss_sum, vm_count]`` when ``labels`` is given (see
        ``forward_step.loss_func``), else the MM logits [B, T, V/tp].

        ``packing`` (every stage, middle ones included): the document boundaries of a packed
        micro-batch (B = 1); attention, RoPE, targets and the KL then stay within documents."""
        has_images = self.needs_image_features and images is not None and images.shape[0] > 0
        features = self.image_features(images) if has_images else None
        vm_logits = (
            self.visual_word_logits(features) if features is not None and self.has_vm_head else None
        )

        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=tokens, position_ids=None)
            if features is not None:
                spliced = features
                if self.vwlmm_config.pif:
                    word_embeddings = self.language_model.embedding.word_embeddings.weight
                    spliced = pseudo_image_features(
                        vm_logits, word_embeddings, parallel_state.get_tensor_model_parallel_group()
                    )
                decoder_input = scatter_image_features(decoder_input, image_token_mask, spliced)
            if self.config.sequence_parallel:
                # Each TP rank keeps its slice of the sequence (megatron's embedding does this
                # itself when nothing is spliced in); clone so the whole one can be freed.
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(
                    decoder_input).clone()

        output = self.language_model(
            input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input,
            packed_seq_params=packing.packed_seq_params() if packing is not None else None,
        )
        if not self.post_process or labels is None:
            return output
        return self._loss_statistics(output, labels, image_token_mask, vm_logits, packing)

    def _loss_statistics(self, logits, labels, image_token_mask, vm_logits,
                         packing: Optional[PackedSequence] = None) -> torch.Tensor:
        """Sums and counts of both losses on this micro-batch (vocab-parallel, no gather)."""
        lm_loss, supervised, vm_loss, vm_positions = self._position_losses(
            logits, labels, image_token_mask, vm_logits, packing)
        return torch.stack([lm_loss.sum(), supervised.sum().float(), vm_loss.sum(),
                            vm_positions.sum().float()])

    def _position_losses(self, logits, labels, image_token_mask, vm_logits,
                         packing: Optional[PackedSequence] = None):
        """Both losses laid out per position: ``(lm_loss, supervised, vm_loss, vm_positions)``,
        each [B, T] (fp32 losses, bool masks). ``lm_loss`` at t is the CE of predicting the
        target of t; ``vm_loss`` at an image position t is KL(visual word at t || next-token
        distribution at t - 1), zero where there is none."""
        cu_seqlens = packing.cu_seqlens if packing is not None else None
        vm_loss = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        vm_positions = torch.zeros(labels.shape, dtype=torch.bool, device=logits.device)
        if vm_logits is not None:
            positions = document_positions(cu_seqlens)[None] if packing is not None else None
            keep, (batch_index, prev_position) = visual_word_positions(image_token_mask,
                                                                       positions)
            # Gather the prediction rows before the CE below subtracts maxima in place.
            mm_rows = logits[batch_index, prev_position]
            target_rows = vm_logits[keep]
            if self.vwlmm_config.vm_target_grad == "detach":
                target_rows = target_rows.detach()
            kl = visual_word_kl(mm_rows, target_rows, chunk_size=self.vwlmm_config.kl_chunk_size)
            vm_loss = vm_loss.index_put((batch_index, prev_position + 1), kl.float())
            vm_positions[batch_index, prev_position + 1] = True

        targets = next_token_targets(labels, cu_seqlens)
        supervised = targets != IGNORE_INDEX
        ce = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float() if logits.dtype != torch.float32 else logits,
            targets.clamp(min=0),
        )
        return ce * supervised, supervised, vm_loss, vm_positions


def build_model(
    config: VWLMMConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    runtime: Optional[RuntimeOptions] = None,
) -> VWLMMModel:
    """megatron-style model provider for one pipeline chunk."""
    return VWLMMModel(
        config,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        runtime=runtime,
    )
