"""Process groups, the CPU runtime for megatron-core, launch helpers, stage-replicated grads."""
