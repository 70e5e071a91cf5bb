"""Continuous batching: a fixed number of slots decode together; requests join and leave at step boundaries.

One thread (the device thread, `Batcher.run`) owns the model and a KV cache of S slots x C positions (C = the
model's context). A new request is prefilled alone into its slot's cache rows (a one-row forward over its
prompt, right-padded to a power-of-two bucket), then decodes with every other busy slot in one jitted step
[S, 1] -> [S]: each row writes and attends at its own cache position (the cache's per-row `end`). A finished
or cancelled request leaves at the next step boundary and its slot takes the next waiting request, so a long
reply never holds up short ones.

A request's tokens do not depend on what else shares the batch: its prefill runs alone, every decode step
has the same shape [S] whatever the other rows hold, the rows never mix (attention is per row, the matmuls
row-wise), and it samples with its own settings and PRNG key (from its seed, as engine.py keys row 0 of a
request, so a one-prompt `generate` with the same seed samples the same tokens).

Results go to each request's `sink(token, finish_reason)`, called on the device thread: `(id, None)` per
generated token, then once `(None, reason)`: "stop" (a stop id, not passed on), "length" (max_tokens or the
context), "cancelled" or "error".
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimix_jax.inference import sampling as sampling_lib
from mimix_jax.inference.engine import Engine, bucket, next_logits
from mimix_jax.model import transformer
from mimix_jax.model.config import ModelConfig

Sink = Callable[[int | None, str | None], None]
PARAMS = ("temperature", "top_p", "top_k", "min_p")  # per-request sampling settings, one [S] array each


@dataclasses.dataclass
class Request:
  """One generation: prompt ids, how many tokens at most, its sampling settings and where results go."""

  prompt: list[int]
  max_tokens: int
  sink: Sink
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  seed: int = 0
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

  def cancel(self) -> None:
    """Frees the request's slot at the next step boundary (safe from any thread)."""
    self.cancelled.set()


def _choose(logits: jax.Array, params: dict[str, jax.Array], seeds: jax.Array, steps: jax.Array) -> jax.Array:
  """The next token of every row [S]: argmax where temperature is 0, else a sample with the row's key.

  logits [S, V] float32; params: PARAMS -> [S]; seeds, steps [S] (steps: the index of the token chosen).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample(_):
    def one(row, p, seed, step):
      key = sampling_lib.row_keys(seed, jnp.zeros((1,), jnp.int32))[0]
      kept = sampling_lib.filter_logits(row[None] / jnp.maximum(p["temperature"], 1e-6), p["top_k"], p["top_p"],
                                        p["min_p"])[0]
      return jax.random.categorical(jax.random.fold_in(key, step), kept).astype(jnp.int32)
    sampled = jax.vmap(one)(logits, params, seeds, steps)
    return jnp.where(params["temperature"] == 0, greedy, sampled)

  return jax.lax.cond(jnp.all(params["temperature"] == 0), lambda _: greedy, sample, None)


def _prefill(cfg: ModelConfig, weights, cache, slot, tokens, n_valid, params, seeds):
  """Writes one prompt (tokens [1, W], the first n_valid real) into row `slot` of the cache from position 0 and
  picks its first token. params / seeds: that row's settings, shaped [1]."""
  row = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), cache)
  row["end"] = jnp.zeros((1,), jnp.int32)
  width = tokens.shape[1]
  positions = jnp.arange(width, dtype=jnp.int32)[None]
  segment_ids = (positions < n_valid).astype(jnp.int32)  # the bucket's padding is never attended
  h, row = transformer.forward(cfg, weights, tokens, positions, segment_ids, row)
  row["end"] = jnp.full((1,), n_valid, jnp.int32)  # decoding overwrites the padding slots
  cache = jax.tree.map(lambda full, r: jax.lax.dynamic_update_slice_in_dim(full, r, slot, axis=0), cache, row)
  last = jax.lax.dynamic_slice_in_dim(h, n_valid - 1, 1, axis=1)  # [1, 1, d]
  return cache, _choose(next_logits(cfg, weights, last), params, seeds, jnp.zeros((1,), jnp.int32))[0]


def _decode(cfg: ModelConfig, weights, cache, tokens, active, params, seeds, steps):
  """One step for all S slots: feeds tokens [S] at each row's cache end and picks the next [S].

  Idle rows (active False) feed a padding token that attends nothing, and their end stays put.
  """
  end = cache["end"]
  segment_ids = active.astype(jnp.int32)[:, None]
  h, new_cache = transformer.forward(cfg, weights, tokens[:, None], end[:, None], segment_ids, cache)
  new_cache["end"] = end + active.astype(jnp.int32)
  return new_cache, _choose(next_logits(cfg, weights, h), params, seeds, steps)


_prefill_jit = jax.jit(_prefill, static_argnums=0, donate_argnums=2)
_decode_jit = jax.jit(_decode, static_argnums=0, donate_argnums=2)


@dataclasses.dataclass
class _Slot:
  request: Request
  limit: int  # tokens it may generate (max_tokens, within the context)
  count: int = 0  # tokens generated so far


class Batcher:
  """S slots decoding together on one Engine. `submit` from any thread; `run` on the device thread (`start`
  makes one); `stop` ends it."""

  def __init__(self, engine: Engine, *, slots: int, stop_ids: Sequence[int], pad_id: int):
    self.engine, self.cfg = engine, engine.cfg
    self.n_slots, self.context = slots, engine.cfg.max_len
    self.stop_ids, self.pad_id = set(stop_ids), pad_id
    self._queue: queue.Queue[Request | None] = queue.Queue()
    self._slots: list[_Slot | None] = [None] * slots
    self._tokens = np.full(slots, pad_id, np.int32)  # each row's newest token, fed by the next step
    self._seeds = np.zeros(slots, np.uint32)
    self._params = {k: np.zeros(slots, np.int32 if k == "top_k" else np.float32) for k in PARAMS}
    self._cache = engine.new_cache(slots, self.context)
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.finished: collections.Counter[str] = collections.Counter()  # requests that left, by reason

  @property
  def busy(self) -> int:
    """Slots holding a request now."""
    return sum(s is not None for s in self._slots)

  @property
  def waiting(self) -> int:
    return self._queue.qsize()

  def submit(self, request: Request) -> None:
    """Queues a request; raises ValueError (see `check`) if it cannot fit in the context."""
    self.check(len(request.prompt), request.max_tokens)
    self._queue.put(request)

  def check(self, n_prompt: int, max_tokens: int) -> None:
    """Raises ValueError unless a prompt of n_prompt tokens and max_tokens more fit in the context."""
    if n_prompt < 1:
      raise ValueError("the prompt has no tokens")
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if n_prompt + max_tokens > self.context:
      raise ValueError(f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed the context of "
                       f"{self.context} tokens")

  def start(self) -> "Batcher":
    self._thread = threading.Thread(target=self.run, name="device", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stopping = True
    self._queue.put(None)
    if self._thread is not None:
      self._thread.join()

  def warm_up(self) -> None:
    """Compiles the decode step and the smallest prefill bucket before serving (call before `start`)."""
    done = threading.Event()
    self._admit(Request([self.pad_id], 2, lambda tok, reason: reason and done.set()), 0)
    self._step()  # compiled even if the first token was a stop id
    while not done.is_set():
      self._step()
    self.finished.clear()

  def run(self) -> None:
    """The device loop: admit waiting requests into free slots, drop cancelled ones, decode one step."""
    while not self._stopping:
      self._admit_waiting(block=self.busy == 0)
      for i, s in enumerate(self._slots):
        if s is not None and s.request.cancelled.is_set():
          self._leave(i, "cancelled")
      if self.busy:
        self._step()
    for i, s in enumerate(self._slots):
      if s is not None:
        self._leave(i, "cancelled")

  def _admit_waiting(self, block: bool) -> None:
    while None in self._slots:
      try:
        request = self._queue.get(block=block)
      except queue.Empty:
        return
      if request is None:  # stop()
        return
      block = False
      if request.cancelled.is_set():
        request.sink(None, "cancelled")
        continue
      self._admit(request, self._slots.index(None))

  def _admit(self, request: Request, i: int) -> None:
    """Prefills `request` into slot i and hands on its first token."""
    n = len(request.prompt)
    width = min(bucket(n), self.context)
    tokens = np.full((1, width), self.pad_id, np.int32)
    tokens[0, :n] = request.prompt
    self._seeds[i] = np.uint32(request.seed % 2**32)
    for k in PARAMS:
      self._params[k][i] = getattr(request, k)
    row = {k: v[i:i + 1] for k, v in self._params.items()}
    try:
      self._cache, tok = _prefill_jit(self.cfg, self.engine.weights, self._cache, np.int32(i), tokens,
                                      np.int32(n), row, self._seeds[i:i + 1])
    except Exception:  # noqa: BLE001 - one request (a compile out of memory) must not stop the device thread
      self._params["temperature"][i] = 0
      request.sink(None, "error")
      return
    self._slots[i] = _Slot(request, limit=min(request.max_tokens, self.context - n))
    self._take(i, int(tok))

  def _step(self) -> None:
    active = np.asarray([s is not None for s in self._slots])
    steps = np.asarray([s.count if s is not None else 0 for s in self._slots], np.int32)
    self._cache, toks = _decode_jit(self.cfg, self.engine.weights, self._cache, self._tokens, active,
                                    self._params, self._seeds, steps)
    for i, tok in enumerate(np.asarray(toks).tolist()):
      if self._slots[i] is not None:
        self._take(i, tok)

  def _take(self, i: int, tok: int) -> None:
    """Slot i's newest token: a stop id ends it, else it is handed on and fed by the next step."""
    s = self._slots[i]
    if tok in self.stop_ids:
      self._leave(i, "stop")
      return
    s.count += 1
    self._tokens[i] = tok
    s.request.sink(tok, None)
    if s.count >= s.limit:
      self._leave(i, "length")

  def _leave(self, i: int, reason: str) -> None:
    s, self._slots[i] = self._slots[i], None
    self._tokens[i] = self.pad_id
    self._params["temperature"][i] = 0  # an idle row never makes the step sample
    self.finished[reason] += 1
    s.request.sink(None, reason)


def collect(batcher: Batcher, requests: Sequence[dict[str, Any]]) -> list[tuple[list[int], str]]:
  """Submits requests (Request fields but `sink`) at once and waits for all: (tokens, finish_reason) each."""
  results: list[tuple[list[int], list[str]]] = [([], []) for _ in requests]
  done = threading.Semaphore(0)

  def sink_for(k: int) -> Sink:
    def sink(tok: int | None, reason: str | None) -> None:
      if tok is not None:
        results[k][0].append(tok)
      if reason is not None:
        results[k][1].append(reason)
        done.release()
    return sink

  for k, fields in enumerate(requests):
    batcher.submit(Request(sink=sink_for(k), **fields))
  for _ in requests:
    done.acquire()
  return [(tokens, reasons[0]) for tokens, reasons in results]
