"""Text in, text out, on an Engine: prompts in the run's mode (raw continuation or the chat template), batched
generation, and a token-by-token stream."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from mimix_jax.inference.engine import Engine, Generation, TokenStream, bucket, generate_ids
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.text.tokenizer import Tokenizer


def sampling_from(generation: dict[str, Any], **overrides: Any) -> SamplingConfig:
  """A run's sampling defaults (RunInfo.generation; None = the neutral value), then overrides (None = keep)."""
  fields = {f.name for f in dataclasses.fields(SamplingConfig)}
  values = {k: v for k, v in generation.items() if k in fields and v is not None}
  values.update({k: v for k, v in overrides.items() if v is not None})
  return SamplingConfig(**values)


def encode_prompt(tokenizer: Tokenizer, text: str, *, chat: bool, system: str | None = None) -> list[int]:
  """Chat: the Llama-3 template ([system,] user, then the assistant header). Raw: <|begin_of_text|> + text."""
  if not chat:
    return tokenizer.encode(text, bos=True)
  messages = ([dict(role="system", content=system)] if system else []) + [dict(role="user", content=text)]
  return tokenizer.encode_dialog_prompt(messages, bos=True)


def generate(engine: Engine, tokenizer: Tokenizer, prompts: Sequence[str], *, chat: bool = False,
             system: str | None = None, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 256,
             stop_ids: Sequence[int] | None = None, batch_size: int = 8) -> list[Generation]:
  """Texts in, one Generation (ids and decoded text) per prompt out; see engine.generate_ids."""
  stop_ids = tokenizer_lib.stop_ids(tokenizer) if stop_ids is None else stop_ids
  ids = [encode_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
  out = generate_ids(engine, ids, stop_ids=stop_ids, pad_id=tokenizer.pad_id, sampling=sampling,
                     max_new_tokens=max_new_tokens, batch_size=batch_size)
  for g in out:
    g.text = tokenizer.decode(g.tokens)
  return out


def stream(engine: Engine, tokenizer: Tokenizer, prompt: str, *, chat: bool = False, system: str | None = None,
           sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 256,
           stop_ids: Sequence[int] | None = None) -> TokenStream:
  """One prompt, decoded token by token: iterate the result for text increments (same tokens as generate)."""
  stop_ids = tokenizer_lib.stop_ids(tokenizer) if stop_ids is None else stop_ids
  ids = encode_prompt(tokenizer, prompt, chat=chat, system=system)
  cache = engine.new_cache(1, bucket(len(ids)) + bucket(max_new_tokens))
  state = engine.start(cache, [ids], sampling=sampling, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                       pad_id=tokenizer.pad_id)
  return TokenStream(engine, state, tokenizer, stop_ids, max_new_tokens)
