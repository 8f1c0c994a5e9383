"""Building blocks of Qwen3-Next: norms, rotary, gated attention, gated DeltaNet, MoE, swappable linear."""
