"""A chat conversation (or a series of raw continuations) on one Engine, kept in a one-row KV cache.

Chat mode keeps the conversation in the cache: each turn prefills only its new tokens (the previous reply's
closing <|eot_id|>, the user message and the assistant header), never the history again. Every assistant turn
is closed with <|eot_id|> as in training, whatever stopped it. When the next turn would not fit, the oldest turns
are dropped (the system message stays), the rest is prefilled once, and the user is told. Raw mode continues
each input independently.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

from mimix_jax.inference.engine import Engine, TokenStream
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.text.tokenizer import Tokenizer


class ChatSession:
  """A conversation (chat mode) or a series of independent continuations (raw mode) on one Engine.

  Chat history: `prefix` ([bos] + the system message) and `turns` (each: user message, assistant header,
  reply, <|eot_id|>). The cache holds the first `cached` tokens of prefix + turns; `pending` are the history
  tokens not fed yet (the reply's newest token and its closing <|eot_id|>), prefilled with the next turn.
  """

  def __init__(self, engine: Engine, tokenizer: Tokenizer, *, chat: bool, system: str | None,
               sampling: SamplingConfig, max_new_tokens: int, stop_ids: Sequence[int],
               notify: Callable[[str], None] = print):
    self.engine, self.tokenizer = engine, tokenizer
    self.chat, self.system = chat, system
    self.sampling, self.max_new_tokens = sampling, max_new_tokens
    self.stop_ids = list(stop_ids)
    self.notify = notify
    self.max_len = engine.cfg.max_len
    self.turn_count = 0  # folded into the sampling keys, so repeated questions get fresh samples
    self.reset()

  def reset(self) -> None:
    self.cache = None  # allocated by the first turn
    self.cached = 0
    self.pending: list[int] = []
    self.turns: list[list[int]] = []
    system = [dict(role="system", content=self.system)] if self.system else []
    self.prefix = self.tokenizer.encode_dialogs([system], bos=True)[0][0].tolist()

  def set_system(self, text: str | None) -> None:
    self.system = text or None
    self.reset()

  def reply(self, text: str) -> "Reply":
    """Starts the reply to `text` (prefill and first token); iterate the result for the text.

    Raises ValueError (before anything is generated) when the message cannot fit in the context.
    """
    new, user = self._prepare(text)
    if self.cache is None:
      self.cache = self.engine.new_cache(1, self.max_len)
    state = self.engine.start(self.cache, [new], sampling=self.sampling, stop_ids=self.stop_ids,
                              max_new_tokens=self.max_new_tokens, pad_id=self.tokenizer.pad_id,
                              start_positions=[self.cached], row_ids=[self.turn_count])
    self.cache = None  # donated to the decode state; _record takes it back
    stream = TokenStream(self.engine, state, self.tokenizer, self.stop_ids, self.max_new_tokens)
    return Reply(lambda: self._record(stream, new, user), stream)

  def _prepare(self, text: str) -> tuple[list[int], list[int]]:
    """(the tokens to prefill for this turn, the user message's tokens), making room in the context if needed."""
    if not self.chat:
      self.reset()
      tokens = self.tokenizer.encode(text, bos=True)
      if len(tokens) >= self.max_len:
        raise ValueError(f"the text has {len(tokens)} tokens; the context holds {self.max_len}")
      return tokens, []
    user = self.tokenizer.encode_dialog_prompt([dict(role="user", content=text)], bos=False)
    reserve = min(self.max_new_tokens, self.max_len // 4)  # room kept for the reply
    if len(self.prefix) + len(user) + 1 > self.max_len:
      raise ValueError(f"the message has {len(user)} tokens; with the system message the context holds "
                       f"{self.max_len - len(self.prefix) - 1}")
    history = len(self.prefix) + sum(map(len, self.turns))
    if history + len(user) + reserve <= self.max_len:
      new = (self.prefix if self.cached == 0 else []) + self.pending + user
    else:
      dropped = 0
      while self.turns and history + len(user) + reserve > self.max_len:
        history -= len(self.turns.pop(0))
        dropped += 1
      if dropped:
        self.notify(f"[context full ({self.max_len} tokens): dropped the {dropped} oldest turn(s)]")
      self.cache, self.cached, self.pending = None, 0, []
      new = self.prefix + [t for turn in self.turns for t in turn] + user
    return new, user

  def _record(self, stream: TokenStream, new: list[int], user: list[int]) -> None:
    """Books the finished (or interrupted) turn: what the cache now holds, what is still to feed."""
    self.cache = stream.state.cache
    fed = stream.count - 1  # the newest token is never in the cache
    self.cached += len(new) + fed
    self.turn_count += 1
    if self.chat:
      end = self.tokenizer.end_of_turn()
      self.pending = stream.tokens[fed:] + end
      self.turns.append(user + stream.tokens + end)


class Reply:
  """One turn's streaming reply: iterate for text increments. Stopping early is fine: close() (also run when
  the iteration ends) books what was generated into the history."""

  def __init__(self, record: Callable[[], None], stream: TokenStream):
    self._record, self._stream = record, stream
    self._closed = False

  def __iter__(self) -> Iterator[str]:
    try:
      yield from self._stream
    finally:
      self.close()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._record()

  @property
  def finish_reason(self) -> str:
    """"stop" | "length" | "context", or "interrupted" when closed early."""
    return self._stream.finish_reason or "interrupted"


PARAMS = [f.name for f in dataclasses.fields(SamplingConfig)] + ["max_new_tokens"]


def format_params(session: ChatSession) -> str:
  values = dataclasses.asdict(session.sampling) | {"max_new_tokens": session.max_new_tokens}
  return " ".join(f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in PARAMS)


def set_params(session: ChatSession, assignments: Sequence[str]) -> None:
  """Applies name=value pairs; all or nothing (raises ValueError)."""
  changes: dict[str, float | int] = {}
  for item in assignments:
    name, sep, value = item.partition("=")
    if not sep or name not in PARAMS:
      raise ValueError(f"expected name=value with name one of {', '.join(PARAMS)}; got {item!r}")
    as_int = name in ("top_k", "repetition_window", "seed", "max_new_tokens")
    try:
      changes[name] = int(value) if as_int else float(value)
    except ValueError:
      raise ValueError(f"{name}: {value!r} is not a{'n integer' if as_int else ' number'}") from None
  max_new = int(changes.pop("max_new_tokens", session.max_new_tokens))
  if max_new < 1:
    raise ValueError("max_new_tokens must be >= 1")
  session.sampling = session.sampling.replace(**changes)
  session.max_new_tokens = max_new
