"""Requests -> token rows, exactly as lm-eval 0.4.13's HFLM encodes them under `lm_eval --model hf`.

TemplateLM.loglikelihood / _encode_pair and HFLM.tok_encode / _loglikelihood_tokens, with our tokenizer in
place of the export's (which gives the same ids: export verifies it):

- trailing whitespace of the context moves to the front of the continuation ("Answer: " + "x" is scored as
  "Answer:" + " x");
- context = encode(context) and the continuation = encode(context + continuation) minus that many leading
  ids: the whole string is encoded once, so a merge across the boundary is the whole string's;
- `encode` adds the tokenizer's default special tokens, i.e. our export's bos (add_bos_token is unset by
  default, so the tokenizer's post-processor decides, and ours prepends <|begin_of_text|>);
- an empty context (never produced by these tasks' templates, but possible for a lambada row of one word) is
  the prefix token (bos) alone, and the continuation is encoded without bos;
- a row longer than max_len + 1 tokens loses tokens on the left: the model sees the last max_len of
  context + continuation[:-1] and scores the continuation's len(continuation) tokens.

lm-eval skips its add_special_tokens when the text already starts with the bos string; our tokenizer encodes
special-token strings in text as plain text, so such text would differ (none of these tasks produce it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
  n = len(context) - len(context.rstrip())
  return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]], max_len: int) -> list[tuple[np.ndarray, int]]:
  """(tokens int32 [<= max_len + 1], n_continuation) per (context, continuation).

  tokens[:-1] is the model's input and the last n_continuation of tokens[1:] are the scored targets.
  `tokenizer` is a mimix Tokenizer (encode_many, bos_id). Contexts are encoded once each (choices share one).
  """
  pairs = [split_trailing_space(c, x) if c else (c, x) for c, x in requests]
  contexts = list(dict.fromkeys(c for c, _ in pairs if c))
  ctx_ids = dict(zip(contexts, _encode_all(tokenizer, contexts)))
  wholes = _encode_all(tokenizer, [c + x if c else x for c, x in pairs])
  bos = np.asarray([tokenizer.bos_id], np.int32)
  rows = []
  for (context, continuation), whole in zip(pairs, wholes):
    if context:
      ctx = np.concatenate([bos, ctx_ids[context]])
      cont = whole[len(ctx) - 1:]  # `whole` lacks the bos that both encodings start with
    else:  # HFLM: [prefix] + continuation, unless the continuation already starts with the prefix token
      ctx, cont = (bos, whole) if len(whole) and whole[0] != tokenizer.bos_id else (whole[:1], whole[1:])
    if not 0 < len(cont) <= max_len:
      raise ValueError(f"continuation {continuation!r} encodes to {len(cont)} tokens; lm-eval needs 1 to the "
                       f"model's max_len ({max_len})")
    rows.append((np.concatenate([ctx, cont])[-(max_len + 1):], len(cont)))
  return rows


def _encode_all(tokenizer, texts: list[str]) -> list[np.ndarray]:
  """Each text's ids (no bos), from one batched SentencePiece call."""
  ids, lengths = tokenizer.encode_many(texts)
  return np.split(ids, np.cumsum(lengths)[:-1]) if len(texts) else []
