"""Models: loading (dtype, attention), adapters (LoRA / DoRA) and merging."""
