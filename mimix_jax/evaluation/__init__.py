"""Evaluation of a trained model: perplexity on raw text (perplexity)."""
