"""Tiny HF source models, tokenizer and the megatron/HF logit functions of the conversion tests
(module level: spawned ranks import it)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.megatron_vwlmm.model import cases

VOCAB = cases.VOCAB  # 256
SEQ = 64
# Llama: MHA, non-default RoPE theta and eps; Mistral: GQA (4 heads, 2 KV groups).
LLM_SHAPES = {
    "llama": dict(num_key_value_heads=4, rope_theta=500000.0, rms_norm_eps=1e-6),
    "mistral": dict(num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-5,
                    sliding_window=None),
}


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_llm_dir(path: Path, arch: str, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls = (MistralConfig, MistralForCausalLM) if arch == "mistral" else \
        (LlamaConfig, LlamaForCausalLM)
    config = cls_cfg(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=SEQ, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=False, **LLM_SHAPES[arch])
    model = cls(config)
    _perturb(model, seed)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def make_tokenizer(path: Path) -> Path:
    """A 256-token word-level tokenizer (== the tiny vocab, so <image> extends it by one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "a", "photo", "of", "cat", "dog", "USER:", "ASSISTANT:",
             "describe", "the", "image", "[INST]", "[/INST]", "."]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return path


def make_clip_dir(path: Path, seed: int = 1) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=32)
    model = CLIPVisionModel(config)
    _perturb(model, seed)
    model.save_pretrained(path)
    return path


def siglip_vision_model(image_size: int = 32, seed: int = 3):
    """A tiny transformers ``SiglipVisionModel`` (pooling head on), weights moved off init."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, image_size=image_size, patch_size=8,
                                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    model = SiglipVisionModel(config).eval()
    _perturb(model, seed)
    return model


def make_siglip_dir(path: Path, seed: int = 3) -> Path:
    siglip_vision_model(seed=seed).save_pretrained(path)
    return path


def make_projector(path: Path, seed: int = 2) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {"model.mm_projector.0.weight": 0.2 * torch.randn(64, 32, generator=g),
             "model.mm_projector.0.bias": 0.1 * torch.randn(64, generator=g),
             "model.mm_projector.2.weight": 0.2 * torch.randn(64, 64, generator=g),
             "model.mm_projector.2.bias": 0.1 * torch.randn(64, generator=g)}
    torch.save(state, path)
    return path


def batch():
    from megatron_vwlmm.model import collate_samples

    return collate_samples(cases.raw_samples(), seq_length=SEQ, num_patches=16, pad_token_id=0)


def hf_reference(llm_dir, vision_dir, projector_path, b):
    """Logits of the stock HF source models on the spliced batch (LLaVA's recipe: CLIP
    penultimate layer, CLS dropped, mlp2x_gelu, features in place of the image positions)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32,
                                               attn_implementation="eager")
    clip = CLIPVisionModel.from_pretrained(vision_dir, dtype=torch.float32,
                                           attn_implementation="eager")
    proj = {k.split("mm_projector.")[-1]: v for k, v in torch.load(projector_path).items()}
    with torch.no_grad():
        feats = clip(b.images, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = torch.nn.functional.gelu(feats @ proj["0.weight"].T + proj["0.bias"])
        feats = feats @ proj["2.weight"].T + proj["2.bias"]
        embeds = llm.get_input_embeddings()(b.tokens).clone()
        embeds[b.image_token_mask] = feats.reshape(-1, feats.shape[-1])
        return llm(inputs_embeds=embeds).logits


def hf_inputs(b, image_token_index: int = VOCAB) -> dict:
    """llava-hf inputs of a batch: its image positions hold the image token."""
    ids = b.tokens.clone()
    ids[b.image_token_mask] = image_token_index
    return dict(input_ids=ids, pixel_values=b.images, attention_mask=torch.ones_like(ids))


def llava_export_outputs(export_dir: Path, b):
    """(stock ``LlavaForConditionalGeneration`` logits over the text vocab, the visual-word
    logits [images, patches, vocab], the visual-word KL) of an llava-hf export on batch ``b``.

    The KL is the reference formula (``tests/megatron_vwlmm/reference_vwlmm.py``):
    KLDivLoss(batchmean) of log_softmax of the shifted MM logits against softmax of the VM
    logits at the image positions."""
    import torch.nn.functional as F
    from transformers import LlavaForConditionalGeneration

    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration

    stock = LlavaForConditionalGeneration.from_pretrained(
        export_dir, attn_implementation="eager").eval()
    model = VWLMMForConditionalGeneration.from_pretrained(
        export_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = stock(**hf_inputs(b)).logits[..., :VOCAB]
        mm = model(**hf_inputs(b)).logits[..., :model.text_vocab_size]
        z = model.visual_word_logits(b.images)
    vm = torch.zeros(*b.tokens.shape, VOCAB)
    vm[b.image_token_mask] = z.reshape(-1, VOCAB)
    shift_mask = b.image_token_mask[:, 1:]
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(mm[:, :-1][shift_mask], dim=-1), F.softmax(vm[:, 1:][shift_mask], dim=-1))
    return logits, z, float(kl)


def megatron_outputs(ckpt_dir: str, b, with_loss: bool = False, save_to: str | None = None):
    """On every rank of the current layout: load ``ckpt_dir`` (resharding), run the pipeline
    forward; returns the full-vocab logits (and lm/vm losses) on the last stage's TP rank 0."""
    from functools import partial

    from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vwlmm.checkpoint.metadata import config_to_dict
    from megatron_vwlmm.convert.megatron_io import resolve_checkpoint
    from megatron_vwlmm.model import build_model, replace
    from megatron_vwlmm.model.forward_step import loss_func

    config = replace(resolve_checkpoint(ckpt_dir).config, transformer_impl="local")
    model = build_model(config, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage())
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    model.load_state_dict(loaded["model"])
    model.eval()

    def collect(labels, output):
        if labels is not None:
            total, metrics = loss_func(config.lambda_vm, output)
            return total, metrics
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0, {"logits": full}

    def run(with_labels):
        def step(data_iterator, m):
            x = next(data_iterator)
            out = m(tokens=x.tokens, image_token_mask=x.image_token_mask, images=x.images,
                    labels=x.labels if with_labels else None)
            return out, partial(collect, x.labels if with_labels else None)

        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([b]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=b.tokens.shape[0], forward_only=True)
        return store[0] if ps.is_pipeline_last_stage() and store else {}

    with torch.no_grad():
        result = run(False)
        if with_loss:
            result.update(run(True))
    if save_to:
        sharded = {"model": model.sharded_state_dict(), "vwlmm_config": config_to_dict(config),
                   "layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                              "pp": ps.get_pipeline_model_parallel_world_size()}}
        Path(save_to).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(sharded, save_to, sharded_strategy=("torch_dist", 1))
    last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return result if last else None
