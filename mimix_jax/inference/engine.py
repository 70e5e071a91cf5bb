"""Token generation with a preallocated KV cache: batched, jitted prefill and an on-device decode loop.

Layout. A batch of prompts is LEFT-padded (segment id 0) so every row's last prompt token sits in the same
cache slot and every decode step writes all rows at one slot; positions count from 0 at each row's first
real token. The prompt is then RIGHT-padded up to a power-of-two bucket so that few shapes get compiled;
the cache's `end` is set back to just after the real tokens, so the padding slots are overwritten by the
decode steps and never attended (attention only looks at earlier slots of the same non-zero segment).

Decoding. `Engine.start` prefills and picks the first token; `Engine.finish` runs the rest in one
`lax.while_loop` on the device (no host round trip per token); `Engine.step` does one token, for streaming.
All three take and return a `DecodeState`, whose buffers are donated so the cache is updated in place.

Stopping: a row stops at any stop id (eos, eot and configured ids), after max_new_tokens, or when the context
(model.max_len positions) is full; the prompt is never truncated: a prompt that leaves no room raises a clear
error instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimix_jax.inference import sampling as sampling_lib
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.model import transformer
from mimix_jax.model.config import ModelConfig
from mimix_jax.model.layers import mask_padded_vocab
from mimix_jax.model.transformer import Cache
from mimix_jax.text.tokenizer import StreamDecoder, Tokenizer

MIN_BUCKET = 16


def bucket(n: int) -> int:
  """The power of two >= n (at least MIN_BUCKET): the padded size compiled shapes come in."""
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything the decode loop carries. B rows, N = token buffer size.

  `tokens[:, :count]` are the generated tokens (pad_id after a row stopped); the newest one,
  `tokens[:, count - 1]`, is not in the cache yet: it is fed at `positions` by the next step.
  """

  cache: Cache
  tokens: jax.Array  # [B, N] int32
  count: jax.Array  # [] tokens generated so far (rows advance together)
  limit: jax.Array  # [] stop after this many tokens
  positions: jax.Array  # [B] RoPE position of the newest token
  done: jax.Array  # [B] bool: the row emitted a stop id
  keys: jax.Array  # [B] per-row PRNG keys
  stop_ids: jax.Array  # [n_stop] int32
  sampling: dict[str, jax.Array]  # SamplingConfig.arrays()
  greedy: bool = dataclasses.field(metadata=dict(static=True))
  penalize: bool = dataclasses.field(metadata=dict(static=True))
  pad_id: int = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass
class Generation:
  """One prompt's result."""

  prompt_tokens: list[int]
  tokens: list[int]  # generated ids, without the stop id
  finish_reason: str  # "stop" (a stop id), "length" (max_new_tokens) or "context" (the context is full)
  text: str = ""  # filled in by the text-level functions


def next_logits(cfg: ModelConfig, weights: dict[str, Any], h: jax.Array) -> jax.Array:
  """h [B, 1, d] -> float32 logits [B, V_padded] (padded entries -inf).

  On XLA:CPU a batch-1 (matrix-vector) dot transposes the [V, d] output projection on every call (53 of the 85 ms
  of a base-model step), so batch 1 reads the engine's [d, V] copy; at batch 8 the [V, d] layout is the faster one.
  """
  if h.shape[0] > 1:
    return transformer.logits(transformer.output_head(cfg, weights), h, cfg.vocab_size)[:, 0]
  logits = jnp.einsum("bd,dv->bv", h[:, 0], weights["head_t"], preferred_element_type=jnp.float32)
  return mask_padded_vocab(logits, cfg.vocab_size)


def _choose(logits: jax.Array, state: DecodeState) -> jax.Array:
  """The token of index state.count for every row [B] (pad_id for rows that already stopped)."""
  tok = sampling_lib.next_token(logits, state.sampling, state.keys, state.count, state.tokens, state.count,
                                greedy=state.greedy, penalize=state.penalize)
  return jnp.where(state.done, state.pad_id, tok)


def _record(state: DecodeState, tok: jax.Array, **changes: Any) -> DecodeState:
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok[:, None], state.count, axis=1)
  done = state.done | jnp.isin(tok, state.stop_ids)
  return dataclasses.replace(state, tokens=tokens, count=state.count + 1, done=done, **changes)


def _start(cfg: ModelConfig, weights, cache: Cache, prompt: dict[str, jax.Array], settings: dict[str, Any], *,
           n_buf: int, greedy: bool, penalize: bool, pad_id: int) -> DecodeState:
  """Prefills the prompt into the cache, picks token 0 and returns the decode state.

  prompt: tokens / positions / segment_ids [B, T] (real tokens in columns < n_valid), n_valid [],
  next_positions [B]; settings: limit, seed, row_ids [B], stop_ids, sampling (SamplingConfig.arrays()).
  """
  h, new_cache = transformer.forward(cfg, weights, prompt["tokens"], prompt["positions"], prompt["segment_ids"], cache)
  n_valid = prompt["n_valid"]
  new_cache["end"] = cache["end"] + n_valid  # forget the right padding: decoding overwrites it
  b = prompt["tokens"].shape[0]
  state = DecodeState(
      cache=new_cache,
      tokens=jnp.full((b, n_buf), pad_id, jnp.int32),
      count=jnp.zeros((), jnp.int32),
      limit=settings["limit"],
      positions=prompt["next_positions"],
      done=jnp.zeros((b,), bool),
      keys=sampling_lib.row_keys(settings["seed"], settings["row_ids"]),
      stop_ids=settings["stop_ids"],
      sampling=settings["sampling"],
      greedy=greedy, penalize=penalize, pad_id=pad_id)
  last = jax.lax.dynamic_slice_in_dim(h, n_valid - 1, 1, axis=1)  # [B, 1, d]
  return _record(state, _choose(next_logits(cfg, weights, last), state))


def _step(cfg: ModelConfig, weights, state: DecodeState) -> DecodeState:
  """Feeds the newest token of every row and picks the next."""
  newest = jax.lax.dynamic_slice_in_dim(state.tokens, state.count - 1, 1, axis=1)  # [B, 1]
  h, cache = transformer.forward(cfg, weights, newest, state.positions[:, None], jnp.ones_like(newest), state.cache)
  tok = _choose(next_logits(cfg, weights, h), state)
  return _record(state, tok, cache=cache, positions=state.positions + 1)


def _running(state: DecodeState) -> jax.Array:
  return (state.count < state.limit) & ~jnp.all(state.done)


def _finish(cfg: ModelConfig, weights, state: DecodeState) -> DecodeState:
  return jax.lax.while_loop(_running, lambda s: _step(cfg, weights, s), state)


_start_jit = jax.jit(_start, static_argnums=0, static_argnames=("n_buf", "greedy", "penalize", "pad_id"),
                     donate_argnums=2)
_step_jit = jax.jit(_step, static_argnums=0, donate_argnums=2)
_finish_jit = jax.jit(_finish, static_argnums=0, donate_argnums=2)


@functools.partial(jax.jit, static_argnums=1)
def _decode_weights(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The decode layout: one weight dict per layer, the embedding (and an untied lm_head) [V, d] in the compute
  dtype, and the output projection's transpose [d, V] (see next_logits)."""
  dt = jnp.dtype(cfg.dtype)
  tables = {name: params[name].astype(dt) for name in ("embed", "lm_head") if name in params}
  return {**tables, "head_t": transformer.output_head(cfg, tables).T, "final_norm": params["final_norm"],
          "layers": transformer.split_layers(params["layers"], cfg)}


class Engine:
  """A model ready to decode: decode-layout weights made once, jitted prefill / step / loop.

  Compiled code is shared by all engines of the same model config (keyed by the config and the shapes). The
  engine holds its own copy of the weights (one array per layer, see transformer.forward, and a [d, V] copy of
  the embedding): drop the params it was made from to free their memory.
  """

  def __init__(self, cfg: ModelConfig, params: dict[str, Any]):
    self.cfg = cfg
    self.weights = _decode_weights(params, cfg)  # what the jitted functions here and in batching.py read

  def new_cache(self, batch: int, slots: int) -> Cache:
    """An empty cache of `slots` token slots per row."""
    return transformer.init_cache(self.cfg, batch, slots)

  def start(self, cache: Cache, prompts: Sequence[Sequence[int]], *, sampling: SamplingConfig,
            stop_ids: Sequence[int], max_new_tokens: int, pad_id: int,
            start_positions: Sequence[int] | None = None, row_ids: Sequence[int] | None = None) -> DecodeState:
    """Prefills `prompts` (B lists of ids) after what `cache` already holds and picks their first tokens.

    start_positions: each row's position of its first prompt token (default 0; a chat continues its history).
    row_ids: each row's index in the request, for its sampling key (default 0..B-1).
    Raises ValueError when a prompt leaves no room to generate.
    """
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    if b == 0 or min(lengths) == 0:
      raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    starts = np.zeros(b, np.int32) if start_positions is None else np.asarray(start_positions, np.int32)
    slots, end = cache["segment_ids"].shape[1], int(np.max(cache["end"]))  # the rows share one end here
    n_valid = max(lengths)
    next_pos = starts + np.asarray(lengths, np.int32)
    room = min(self.cfg.max_len - int(next_pos.max()), slots - end - n_valid)
    if room < 1:
      raise ValueError(f"the prompt ({int(next_pos.max())} tokens with the history) leaves no room to generate: "
                       f"the context holds {self.cfg.max_len} tokens")
    width = bucket(n_valid) if end + bucket(n_valid) <= slots else n_valid
    tokens = np.full((b, width), pad_id, np.int32)
    positions = np.zeros((b, width), np.int32)
    segment_ids = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
      lo = n_valid - len(p)
      tokens[i, lo:n_valid] = p
      positions[i, lo:n_valid] = starts[i] + np.arange(len(p))
      segment_ids[i, lo:n_valid] = 1
    prompt = dict(tokens=tokens, positions=positions, segment_ids=segment_ids, n_valid=np.int32(n_valid),
                  next_positions=next_pos)
    settings = dict(
        limit=np.int32(min(max_new_tokens, room)),
        seed=np.uint32(sampling.seed),
        row_ids=np.asarray(range(b) if row_ids is None else row_ids, np.int32),
        stop_ids=np.asarray(sorted(set(stop_ids)) or [-1], np.int32),
        sampling=sampling.arrays())
    return _start_jit(self.cfg, self.weights, cache, prompt, settings, n_buf=bucket(max_new_tokens),
                      greedy=sampling.greedy, penalize=sampling.penalize, pad_id=pad_id)

  def step(self, state: DecodeState) -> DecodeState:
    """One more token for every row (the caller checks the count against the limit and stop ids)."""
    return _step_jit(self.cfg, self.weights, state)

  def finish(self, state: DecodeState) -> DecodeState:
    """Decodes until every row stopped or the limit, entirely on the device."""
    return _finish_jit(self.cfg, self.weights, state)


def results(state: DecodeState, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            stop_ids: Sequence[int]) -> list[Generation]:
  """The finished state's tokens per row, cut at the first stop id, with why each row ended."""
  tokens, count = np.asarray(state.tokens), int(state.count)
  stops = set(stop_ids)
  out = []
  for prompt, row in zip(prompts, tokens):
    row = row[:count].tolist()
    cut = next((i for i, t in enumerate(row) if t in stops), None)
    if cut is not None:
      out.append(Generation(list(prompt), row[:cut], "stop"))
    else:
      out.append(Generation(list(prompt), row, "length" if len(row) >= max_new_tokens else "context"))
  return out


def generate_ids(engine: Engine, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 pad_id: int, sampling: SamplingConfig = SamplingConfig(temperature=0.0), max_new_tokens: int = 64,
                 batch_size: int = 8) -> list[Generation]:
  """Generates from token-id prompts, batch_size at a time, each batch decoded on the device in one loop.

  Prompts are batched by length (less padding); results come in prompt order and do not depend on the
  batching (row i samples with the key of request row i).
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[Generation | None] = [None] * len(prompts)
  for lo in range(0, len(order), batch_size):
    idx = order[lo:lo + batch_size]
    batch = [prompts[i] for i in idx]
    slots = bucket(max(len(p) for p in batch)) + bucket(max_new_tokens)
    state = engine.start(engine.new_cache(len(batch), slots), batch, sampling=sampling, stop_ids=stop_ids,
                         max_new_tokens=max_new_tokens, pad_id=pad_id, row_ids=idx)
    state = engine.finish(state)
    for i, g in zip(idx, results(state, batch, max_new_tokens, stop_ids)):
      out[i] = g
  return out


class TokenStream:
  """Decodes a one-row DecodeState token by token (Engine.step) and yields text as it completes.

  Iterate for the text increments (complete UTF-8 only). The consumer may stop early (Ctrl-C in the chat);
  either way `state` is then the latest state, `tokens` the generated ids so far (without a stop id) and
  `count` the tokens the state has produced: the cache holds all of them but the newest one.
  """

  def __init__(self, engine: Engine, state: DecodeState, tokenizer: Tokenizer, stop_ids: Sequence[int],
               max_new_tokens: int):
    self.engine, self.state, self.tokenizer = engine, state, tokenizer
    self.stop_ids = set(stop_ids)
    self.max_new_tokens = max_new_tokens
    self.tokens: list[int] = []
    self.count = 1
    self.finish_reason: str | None = None  # set once the stream ran to its end

  def __iter__(self) -> Iterator[str]:
    decoder = StreamDecoder(self.tokenizer)
    limit = int(self.state.limit)
    while True:
      tok = int(np.asarray(self.state.tokens)[0, self.count - 1])
      if tok in self.stop_ids:
        self.finish_reason = "stop"
        break
      self.tokens.append(tok)
      text = decoder.push(tok)
      if text:
        yield text
      if self.count >= limit:
        self.finish_reason = "length" if self.count >= self.max_new_tokens else "context"
        break
      self.state = self.engine.step(self.state)
      self.count += 1
    tail = decoder.flush()
    if tail:
      yield tail
