"""Serving a run over HTTP: the OpenAI-compatible API on the continuous batcher, and a chat page."""
