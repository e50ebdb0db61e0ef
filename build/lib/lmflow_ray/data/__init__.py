"""Data: formats, sources, conversation templates, tokenization, packing, the Ray Data pipeline."""
