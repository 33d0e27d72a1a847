"""Shared tiny configs and batches for the model tests (module-level: spawned ranks import it)."""

from __future__ import annotations

import torch

from megatron_vwlmm.model import collate_samples, get_preset

VOCAB = 256
SEQ = 96


def tiny_config(**changes):
    base = {"decoder.vocab_size": VOCAB, "decoder.seq_length": SEQ}
    base.update(changes)
    return get_preset("tiny", **base)


def raw_samples(seed: int = 0):
    """Samples mixing text-only, 1-image, 2-image and image-in-the-middle layouts."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    def image():
        return torch.randn(3, 32, 32, generator=g)

    layouts = [
        ([1] + text(9), [-100] + text(0) + ["copy"] * 9, 0),
        ([1, -200] + text(6), None, 1),
        ([1, -200, -200] + text(4), None, 2),
        ([1] + text(3) + [-200] + text(5), None, 1),
    ]
    samples = []
    for ids, _, n_images in layouts:
        # Supervise every text token after the first text run; prompts/images unsupervised.
        labels = [-100 if (i < 2 or t == -200) else t for i, t in enumerate(ids)]
        samples.append({"input_ids": ids, "labels": labels,
                        "images": [image() for _ in range(n_images)]})
    return samples


def batch(samples, config):
    return collate_samples(samples, seq_length=SEQ, num_patches=config.num_patches,
                           pad_token_id=0)


def perturb_(model, seed: int = 0, scale: float = 0.05):
    """Move every weight off its init (norm weights stay near 1) so parity tests see real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = scale * torch.randn(param.shape, generator=g)
            param.add_(noise.to(device=param.device, dtype=param.dtype))
