"""mimix_jax: a JAX/Flax training stack for GPT-style language models.

Library subpackages, one concern each (imports only go down this list; tests/test_layout.py enforces it):
  model/       config and presets, the NNX transformer, attention, RoPE, sharding rules
  text/        the tokenizer, where text is cut before encoding, tokenizer training
  data/        raw readers, record schemas, preprocessing into shards, the batch schema, the Grain pipeline
  hf/          Hugging Face / MimixLM tensor layouts, configs, tokenizer files, export verification (NumPy only)
  training/    objectives and losses, optimizer, the train step and loop, run directories, checkpoints, planner
  inference/   sampling, the decode engine, generation, the chat session
  evaluation/  perplexity
Commands (python -m mimix_jax.X), thin on top: tokenizer, preprocess, train, evaluate, generate, chat, export,
import_hf, demo; `cli` holds what the inference commands share.
"""
