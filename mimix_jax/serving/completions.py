"""One request in flight, at the text level: the prompt's tokens, its settings, and its reply as text deltas.

The batcher calls the request's sink on the device thread; the sink hands each token to this request's asyncio
queue on the event loop, where it is decoded (whole UTF-8 characters only) and checked for stop strings; when
the loop falls behind, the tokens waiting are sent as one delta (fewer, larger chunks, the same text). Text
that could be the start of a stop string is held back until it is not; a stop string ends the reply without
being sent. Leaving early for any reason (the client went away, the task was cancelled) frees the slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import AsyncIterator

from mimix_jax.inference.batching import Batcher, Request
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.serving.schemas import APIError, GenerationFields
from mimix_jax.text.tokenizer import StreamDecoder, Tokenizer

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}  # the batcher's reasons -> OpenAI's


@dataclasses.dataclass
class Served:
  """A run being served: its name, tokenizer, batcher and defaults (from model.json)."""

  model_id: str
  tokenizer: Tokenizer
  batcher: Batcher
  chat: bool  # a chat (SFT / DPO) run: /v1/chat/completions is open
  system: str | None  # the run's system message, used when a chat request has none
  defaults: SamplingConfig
  max_tokens: int  # when a request gives none (cut to the room the prompt leaves)
  api_key: str | None = None
  seeds: itertools.count = dataclasses.field(default_factory=itertools.count)  # for requests without a seed


def held_back(text: str, stops: list[str]) -> int:
  """How many trailing characters of `text` could begin a stop string (they wait for the next token)."""
  return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Completion:
  """A request's reply: iterate `deltas()` for the text; then `finish_reason` and `completion_tokens` are set."""

  def __init__(self, served: Served, prompt: list[int], body: GenerationFields, max_tokens: int | None):
    self.served, self.prompt, self.stops = served, prompt, body.stops()
    room = served.batcher.context - len(prompt)
    if room < 1:
      raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context holds "
                     f"{served.batcher.context} (prompt and reply together)", code="context_length_exceeded")
    self.max_tokens = max_tokens or min(served.max_tokens, room)
    try:
      served.batcher.check(len(prompt), self.max_tokens)
    except ValueError as e:
      raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    d = served.defaults
    self.settings = dict(
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p, top_k=d.top_k, min_p=d.min_p,
        seed=d.seed + next(served.seeds) if body.seed is None else body.seed)
    self.finish_reason: str | None = None
    self.completion_tokens = 0

  async def deltas(self) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    request = Request(self.prompt, self.max_tokens, lambda *event: loop.call_soon_threadsafe(tokens.put_nowait, event),
                      **self.settings)
    self.served.batcher.submit(request)
    decoder = StreamDecoder(self.served.tokenizer)
    text, sent, started = "", 0, False
    try:
      while self.finish_reason is None:
        events = [await tokens.get()]
        while not tokens.empty() and events[-1][1] is None:  # under load, one delta for all that arrived
          events.append(tokens.get_nowait())
        reason = events[-1][1]
        if reason == "error":
          raise APIError(500, "generation failed on the server", kind="server_error")
        for tok, _ in events:
          if tok is not None:
            self.completion_tokens += 1
            text += decoder.push(tok)
        if reason:
          text += decoder.flush()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
          text, reason = text[:cut], "stop"
        end = len(text) if reason else len(text) - held_back(text, self.stops)
        if end > sent or not started:  # the first delta goes out at the first token, even if it is still ""
          yield text[sent:end]
          sent, started = end, True
        self.finish_reason = _FINISH.get(reason) if reason else None
    finally:
      request.cancel()  # a no-op once the batcher let it go; else its slot is freed at the next step

  async def text(self) -> str:
    return "".join([d async for d in self.deltas()])

  def usage(self) -> dict[str, int]:
    return dict(prompt_tokens=len(self.prompt), completion_tokens=self.completion_tokens,
                total_tokens=len(self.prompt) + self.completion_tokens)
