"""One spawned rank for every SigLIP model and conversion check (process launches are the
expensive part): the encoder's features and FLOPs against transformers' ``SiglipVisionModel``,
then both imports of a SigLIP tower and their exports. Module level: the rank imports it."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.megatron_vwlmm.convert import fixtures as fx

# 36 px with 8 px patches: a 4 x 4 grid and a 4 px strip the patch convolution drops, as
# siglip-so400m-patch14-384 drops 6 px (384 = 27 * 14 + 6).
PARITY_IMAGE_SIZE = 36
FEATURE_LAYERS = (-2, -1)


def make_sources(root: Path) -> None:
    """Tiny HF sources: Llama, SigLIP (pooling head on), a projector, and a VW-LMM checkpoint in
    the LLaVA layout whose tower is that SigLIP."""
    from tests.megatron_vwlmm.convert.conftest import make_llava_layout_dir

    fx.make_llm_dir(root / "llama", "llama")
    fx.make_siglip_dir(root / "siglip")
    fx.make_projector(root / "proj.bin")
    make_llava_layout_dir(root, "vwlmm_siglip", root / "llama", root / "siglip", root / "proj.bin",
                          architecture="vwLlamaForCausalLM", vm_head_seed=5)


def _features_and_flops() -> dict:
    """For each feature layer: our patch features vs the HF hidden state, the megatron <-> HF
    vision mapping round trip, torch's FLOP count of the encoder vs our formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_vwlmm.model import build_model, get_preset
    from megatron_vwlmm.vision.hf_formats import MEGATRON_PREFIX, hf_format
    from pipeline.flops import vision_forward_flops

    reference = fx.siglip_vision_model(PARITY_IMAGE_SIZE)
    hf_tensors = dict(reference.state_dict())
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, PARITY_IMAGE_SIZE, PARITY_IMAGE_SIZE, generator=g)
    with torch.no_grad():
        hidden_states = reference(images, output_hidden_states=True).hidden_states
    fmt = hf_format("siglip")
    out = {}
    for feature_layer in FEATURE_LAYERS:
        # megatron's unfused attention: torch's FLOP counter has no formula for SDPA's CPU kernel.
        config = get_preset("tiny", vision="tiny-siglip", attention_backend="unfused", **{
            "decoder.vocab_size": fx.VOCAB, "vision.feature_layer": feature_layer,
            "vision.image_size": PARITY_IMAGE_SIZE})
        model = build_model(config).eval()
        mapped = fmt.from_hf(hf_tensors, config.vision)
        # Strict: the mapping fills every tensor of the encoder and nothing else.
        model.vision_model.load_state_dict(
            {k[len(MEGATRON_PREFIX):]: v for k, v in mapped.items()}, strict=True)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            ours = model.patch_features(images)
        back = fmt.to_hf(mapped, config.vision)
        out[feature_layer] = {
            "ours": ours, "reference": hidden_states[feature_layer],
            "round_trip_exact": all(torch.equal(back[k], hf_tensors[k]) for k in back),
            "round_trip_keys": sorted(back),
            "flops": (counter.get_total_flops(), images.shape[0] * vision_forward_flops(config)),
        }
    return out


def _conversions(root: Path) -> dict:
    """The LLaVA-layout import exported back as such; the LLM + SigLIP import exported to
    llava-hf, and its weights without their source to the VW-LMM layout; megatron's logits and
    losses of the LLM + SigLIP import on the conversion batch."""
    from megatron_vwlmm.convert.exporter import export_checkpoint
    from megatron_vwlmm.convert.importer import import_hf, import_original
    from megatron_vwlmm.convert.megatron_io import (load_checkpoint, resolve_checkpoint,
                                                    save_checkpoint)

    import_original(str(root / "vwlmm_siglip"), str(root / "ck_original"), seq_length=fx.SEQ)
    export_checkpoint(str(root / "ck_original"), str(root / "original_export"), format="vwlmm")
    import_hf(str(root / "llama"), str(root / "siglip"), str(root / "ck_hf"),
              projector=str(root / "proj.bin"), seq_length=fx.SEQ)
    export_checkpoint(str(root / "ck_hf"), str(root / "llava_export"), format="llava-hf")
    # The same weights with no source behind them (as a model trained from scratch): the VW-LMM
    # export writes the tower beside itself, stand-in layers after the feature layer, no head.
    source = resolve_checkpoint(root / "ck_hf")
    save_checkpoint(load_checkpoint(source), source.config, root / "ck_scratch",
                    layout={"tp": 1, "pp": 1}, source={})
    export_checkpoint(str(root / "ck_scratch"), str(root / "scratch_export"), format="vwlmm")
    return fx.megatron_outputs(str(root / "ck_hf"), fx.batch(), with_loss=True)


def run(root: str) -> dict:
    return {"features": _features_and_flops(), "megatron": _conversions(Path(root))}
