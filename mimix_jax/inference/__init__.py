"""Inference: next-token selection (sampling), the KV-cached decode engine (engine), text-level generation
(generation), the chat session (session) and continuous batching for a server (batching). Nothing from training."""
