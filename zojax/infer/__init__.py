"""Inference: generation with a KV cache and offloaded MoE inference (Fate)."""
