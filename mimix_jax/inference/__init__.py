"""Inference: next-token selection (sampling), the KV-cached decode engine (engine), text-level generation
(generation) and the chat session (session). Nothing from training."""
