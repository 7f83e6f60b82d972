"""Trainer side: megatron-core model, conversion, training step, offload, checkpoints."""
