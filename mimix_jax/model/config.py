"""Model hyper-parameters, the parameter table of a layer, and the presets of the original.

The presets are the original MimixLM table plus `tiny`, which trains in seconds on a CPU, and two open
Llama-architecture models to fine-tune (SmolLM2-360M, Llama-3.2-1B). Parameter counts are exact at the default
vocabulary (`param_count` is tested against the original's published numbers). The Llama-family variants (an
untied output head, RoPE theta and scaling, an explicit head dim, max_position_embeddings) default to the
original's model: tied, unscaled, d_model / n_heads, the run's max_len.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mimix_jax.model.rope import RopeScaling

ATTENTION_KERNELS = ("xla", "fused", "cudnn")
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 50256
  n_layers: int = 24
  d_model: int = 1024
  n_heads: int = 8
  n_kv_heads: int = 4
  d_ff: int = 3072
  max_len: int = 1024  # the context a run uses: training sequence length, decode context, RoPE table length
  rope_base: float = 500_000.0  # RoPE theta
  # None, or a RopeScaling (its dict in model.json): {"type": "linear", "factor"} or {"type": "llama3", "factor",
  # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (model/rope.py).
  rope_scaling: RopeScaling | None = None
  head_dim: int = 0  # per-head width D; 0 = d_model / n_heads (Llama checkpoints may give another)
  # The longest context the model is made for (Hugging Face's max_position_embeddings, exported as such); 0 =
  # max_len. max_len may be shorter (the KV cache and RoPE table are sized by max_len), never longer.
  max_position_embeddings: int = 0
  # True: the output projection is the embedding [V, d]. False: its own `lm_head` [V, d] (Llama's untied head).
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  init_std: float = 0.02
  # Embedding rows are padded to a multiple of this for fast matmuls; padded logits are masked to -inf.
  vocab_multiple: int = 128
  dtype: str = "float32"  # compute dtype; params are always float32
  # Training attention. "xla": ours, explicit masks, every backend. "fused": jax.nn.dot_product_attention with
  # cuDNN's fused kernel on a GPU at 16-bit compute, jax's XLA version elsewhere. "cudnn": that kernel or an
  # error. Packed documents reach the fused kernel as a mask; decoding always uses "xla".
  attention: str = "xla"
  # "xla" attention without a cache runs queries in blocks of this many and skips the keys the causal mask
  # discards (0 = one block): less work, the same result (attention.causal_attention).
  attention_q_block: int = 64
  # What the backward pass keeps of each layer: "none" everything, "save_dots" the matmul outputs (recomputing
  # norms, RoPE, softmax and the FFN's elementwise ops), "full" nothing but the layer's input.
  remat: str = "none"
  # Run the layers under lax.scan (compile time independent of depth) or as an unrolled loop over the same
  # stacked weights: on XLA:CPU the scan's per-layer weight slices and stacked activations cost ~20% of a step.
  scan_layers: bool = True

  def __post_init__(self):
    # Derived values are stored resolved, so equal models compare (and hash, as jit's static arguments) equal.
    if not self.head_dim:
      if self.d_model % self.n_heads:
        raise ValueError(f"model.d_model {self.d_model} is not divisible by model.n_heads {self.n_heads} "
                         "(or give model.head_dim)")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    object.__setattr__(self, "rope_scaling", RopeScaling.from_value(self.rope_scaling))
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads {self.n_heads} is not divisible by model.n_kv_heads {self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim {self.head_dim} must be even for rotate-half RoPE")
    if self.max_len > self.max_positions:
      raise ValueError(f"model max_len {self.max_len} exceeds model.max_position_embeddings "
                       f"{self.max_positions}: use a shorter max_len or raise max_position_embeddings")
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")

  @property
  def max_positions(self) -> int:
    """max_position_embeddings, or max_len where that is unset (0)."""
    return self.max_position_embeddings or self.max_len

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_multiple)
    return -(-self.vocab_size // m) * m

  def layer_params(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (one layer's shape, its logical axes); the model stacks each along a leading `layers` axis.

    d model width, H / K query / kv heads, D head dim, F FFN width.
    """
    d, h, k, hd, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
    return {
        "attn_norm": ((d,), ("norm",)),
        "wq": ((d, h, hd), ("embed", "q_heads", "head_dim")),
        "wk": ((d, k, hd), ("embed", "kv_heads", "head_dim")),
        "wv": ((d, k, hd), ("embed", "kv_heads", "head_dim")),
        "wo": ((h, hd, d), ("q_heads", "head_dim", "embed")),
        "mlp_norm": ((d,), ("norm",)),
        "w_gate": ((d, f), ("embed", "mlp")),
        "w_up": ((d, f), ("embed", "mlp")),
        "w_down": ((f, d), ("mlp", "embed")),
    }

  def projection_input_axes(self) -> dict[str, int]:
    """Projection name -> how many leading axes of its layer_params shape contract with its input (the rest are
    its output): wo [H, D, d] reads all heads' outputs; the others read d or F. Norms are not projections."""
    return {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}

  def param_count(self, padded: bool = False) -> int:
    """Exact parameter count; `padded=False` is the number comparable with the original's."""
    per_layer = sum(math.prod(shape) for shape, _ in self.layer_params().values())
    vocab = self.padded_vocab_size if padded else self.vocab_size
    tables = 1 if self.tie_embeddings else 2  # the embedding, and an untied output head of the same shape
    return tables * vocab * self.d_model + self.n_layers * per_layer + self.d_model

  def flops_per_token(self, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM convention (Chowdhery et al. 2022, App. B).

    6 x (every matmul weight, the output projection included, tied or not; the embedding lookup excluded)
    + 12 x n_layers x seq_len x (n_heads x head_dim) for attention scores and values, with the causal
    mask NOT halving it. This is the convention MaxText and nanoGPT use for MFU.
    """
    norms = (2 * self.n_layers + 1) * self.d_model
    lookup = 0 if self.tie_embeddings else self.vocab_size * self.d_model  # tied: the embedding's count stands
    matmul_params = self.param_count() - norms - lookup  # for the output projection; untied: the head's does
    return 6 * matmul_params + 12 * self.n_layers * seq_len * self.n_heads * self.head_dim

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)  # rope_scaling becomes its dict (None stays None)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown model config fields: {sorted(unknown)}")
    return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: trains in seconds, used by tests and `make demo`.
    "tiny": dict(vocab_size=4096, n_layers=4, d_model=192, n_heads=4, n_kv_heads=2, d_ff=512, max_len=256),
    "small": dict(vocab_size=30256, n_layers=6, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1024),
    "base": dict(vocab_size=50256, n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_ff=2304),
    "large": dict(vocab_size=50256, n_layers=24, d_model=1024, n_heads=8, n_kv_heads=4, d_ff=3072),
    "xl": dict(vocab_size=50256, n_layers=36, d_model=1024, n_heads=8, n_kv_heads=4, d_ff=3072),
    # Open Llama-architecture checkpoints, from their config.json (import_hf reads the same values from it).
    "smollm2_360m": dict(vocab_size=49152, n_layers=32, d_model=960, n_heads=15, n_kv_heads=5, d_ff=2560,
                         rope_base=100_000.0, max_position_embeddings=8192),
    "llama3_2_1b": dict(vocab_size=128256, n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192,
                        head_dim=64, rope_base=500_000.0, max_position_embeddings=131072,
                        rope_scaling=dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
