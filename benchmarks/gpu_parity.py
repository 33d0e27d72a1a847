"""VW-LMM on CUDA (NCCL, megatron-core GPU kernels) vs the transformers reference, fp32 and bf16.

Not a CI test (CI has no GPU): run on a GPU host to check the CUDA paths the CPU suite cannot
reach. Same weights and batch as ``tests/megatron_vwlmm/model/test_reference_parity.py``.

    torchrun --nproc_per_node 1 --master_port 29612 benchmarks/gpu_parity.py
"""

from __future__ import annotations

import torch


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"


def _run(pif: bool, bf16: bool) -> tuple[float, float, float, float]:
    from megatron_vwlmm.convert.hf_configs import llm_hf_config, vision_hf_config
    from megatron_vwlmm.convert.hf_mapping import megatron_to_hf
    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.forward_step import forward_step
    from tests.megatron_vwlmm.model import cases
    from tests.megatron_vwlmm.reference_vwlmm import ReferenceVWLMM

    config = cases.tiny_config(pif=pif, bf16=bf16)
    model = build_model(config).cuda()
    cases.perturb_(model)
    samples = cases.raw_samples()
    output, loss_func = forward_step(cases.batch(samples, config).to("cuda"), model)
    _, metrics = loss_func(output)

    reference = ReferenceVWLMM(vision_hf_config(config), llm_hf_config(config), pif=pif)
    reference.llm.config._attn_implementation = "eager"
    hf = megatron_to_hf({k: v.float().cpu() for k, v in model.state_dict().items()
                         if "_extra_state" not in k}, config)
    reference.llm.load_state_dict(hf["llm"])
    reference.vision_tower.load_state_dict(hf["vision"], strict=False)
    reference.mm_projector.load_state_dict(hf["projector"])
    reference.vm_head.load_state_dict(hf["vm_head"])
    images = torch.stack([img for s in samples for img in s["images"]])
    lm_ref, vm_ref, _ = reference([s["input_ids"] for s in samples],
                                  [s["labels"] for s in samples], images)
    return (float(metrics["lm_loss"]), float(lm_ref), float(metrics["vm_loss"]), float(vm_ref))


def main() -> None:
    from megatron_vwlmm.parallel.initialize import initialize_distributed

    initialize_distributed(tp=1, pp=1)
    print(f"device: {_device_name()}  torch {torch.__version__}  "
          f"backend {torch.distributed.get_backend()}")
    print(f"{'mode':>7} {'dtype':>5} {'lm (ours)':>11} {'lm (ref)':>11} {'rel':>9} "
          f"{'vm (ours)':>11} {'vm (ref)':>11} {'rel':>9}")
    for pif in (False, True):
        for bf16 in (False, True):
            lm, lm_ref, vm, vm_ref = _run(pif, bf16)
            print(f"{'pif' if pif else 'normal':>7} {'bf16' if bf16 else 'fp32':>5} "
                  f"{lm:11.6f} {lm_ref:11.6f} {abs(lm - lm_ref) / lm_ref:9.2e} "
                  f"{vm:11.6f} {vm_ref:11.6f} {abs(vm - vm_ref) / vm_ref:9.2e}")


if __name__ == "__main__":
    main()
