"""Data: sources, chat rendering, packing, the embedded Arabic task set and tokenizer."""
