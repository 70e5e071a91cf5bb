"""Text: the tokenizer (sentencepiece BPE, special tokens, the chat template), where text is cut before
encoding (splitting), and tokenizer training (training). No JAX, nothing from the data pipeline."""
