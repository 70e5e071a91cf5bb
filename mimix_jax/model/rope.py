"""Rotary position angles (NumPy): the one definition both the model and the MimixLM export's buffer use.

Rotate-half RoPE (GPT-NeoX / Hugging Face Llama): dimension j of a head pairs with dimension j + D/2 and turns by
position x base^(-2j / D). Angles are computed in float64 and stored float32, as the original does.

`RopeScaling` stretches those frequencies for a longer context exactly as transformers' `modeling_rope_utils`
computes its inverse frequencies: "linear" divides every one by `factor`; "llama3" (Llama 3.1 / 3.2) divides the
low frequencies (wavelength > original_max_position_embeddings / low_freq_factor) by `factor`, keeps the high ones
(wavelength < original / high_freq_factor) and interpolates smoothly between. Neither rescales the angles' sin and
cos (transformers' attention_factor is 1 for both).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

# type -> the fields it reads besides `factor` (the rest must stay at their defaults).
SCALING_FIELDS = {"linear": (), "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """One of the RoPE scalings transformers names `rope_type` "linear" or "llama3"."""

  type: str
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.type not in SCALING_FIELDS:
      raise ValueError(f"model.rope_scaling.type {self.type!r} is not supported: use one of "
                       f"{', '.join(SCALING_FIELDS)} (or no scaling)")
    if not self.factor >= 1.0:
      raise ValueError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")
    for name in SCALING_FIELDS[self.type]:
      if getattr(self, name) is None:
        raise ValueError(f"model.rope_scaling.{name} is required for type {self.type!r}")
    if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError("model.rope_scaling: high_freq_factor must be greater than low_freq_factor")

  @classmethod
  def from_value(cls, value: Any) -> "RopeScaling | None":
    """None, a RopeScaling, or its dict (a model.json / ConfigDict entry) -> RopeScaling or None."""
    if value is None or isinstance(value, RopeScaling):
      return value
    value = dict(value)
    known = {f.name for f in dataclasses.fields(cls)}
    if set(value) - known:
      raise ValueError(f"model.rope_scaling has unknown fields {sorted(set(value) - known)}; known: {sorted(known)}")
    return cls(**value)

  def scale(self, inv_freq: np.ndarray) -> np.ndarray:
    """[D/2] float64 inverse frequencies -> the scaled ones."""
    if self.type == "linear":
      return inv_freq / self.factor
    old = self.original_max_position_embeddings
    low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
    smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """[D/2] float64: base^(-2j / D), scaled if asked."""
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  return inv_freq if scaling is None else scaling.scale(inv_freq)


@functools.lru_cache(maxsize=16)
def sin_cos(max_len: int, head_dim: int, base: float,
            scaling: RopeScaling | None = None) -> tuple[np.ndarray, np.ndarray]:
  """sin, cos tables [max_len, D/2] float32 of the angles position x inverse frequency."""
  angles = np.arange(max_len, dtype=np.float64)[:, None] * inverse_frequencies(head_dim, base, scaling)[None, :]
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
