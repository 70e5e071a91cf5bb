"""Rotary position angles (NumPy): the one definition both the model and the MimixLM export's buffer use.

Rotate-half RoPE (GPT-NeoX / Hugging Face Llama): dimension j of a head pairs with dimension j + D/2 and turns by
position x base^(-2j / D). Angles are computed in float64 and stored float32, as the original does.
"""

from __future__ import annotations

import functools

import numpy as np


def inverse_frequencies(head_dim: int, base: float) -> np.ndarray:
  """[D/2] float64: base^(-2j / D)."""
  return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


@functools.lru_cache(maxsize=16)
def sin_cos(max_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
  """sin, cos tables [max_len, D/2] float32 of the angles position x inverse frequency."""
  angles = np.arange(max_len, dtype=np.float64)[:, None] * inverse_frequencies(head_dim, base)[None, :]
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
