"""Training the tokenizer: a seeded sample of text chunks -> a SentencePiece BPE directory (text/tokenizer.py).

The sample is uniform over the chunks SentencePiece would see (text/splitting.py), bounded in count and
characters, so memory stays O(sample) however large the corpus; the options fix the id layout the Tokenizer
documents (unk 0, the specials, the 256 byte pieces, then merges).
"""

from __future__ import annotations

import heapq
import io
import os
import random
import time
from typing import Any, Iterable

import sentencepiece as spm

from mimix_jax import io_utils
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.text.splitting import CHUNK_CHARS, split_for_encoding


def sample_sentences(texts: Iterable[str], max_sentences: int, max_chars: int, seed: int) -> tuple[list[str], dict]:
  """A uniform random sample of the texts' chunks (`split_for_encoding`), bounded in count and characters.

  Every chunk gets a seeded random key; the sample is the longest prefix of all chunks sorted by key that
  fits both bounds, kept in a bounded max-heap, so memory is O(sample) however large the corpus. Returned in
  corpus order, which makes training reproducible.
  """
  rng = random.Random(seed)
  heap: list[tuple[float, int, str]] = []  # (-key, seq, chunk): the largest key is at heap[0]
  n_chars = seen = seen_chars = 0
  for text in texts:
    for chunk in split_for_encoding(text):
      seen += 1
      seen_chars += len(chunk)
      heapq.heappush(heap, (-rng.random(), seen, chunk))
      n_chars += len(chunk)
      while heap and (len(heap) > max_sentences or n_chars > max_chars):
        n_chars -= len(heapq.heappop(heap)[2])
  sample = [chunk for _, _, chunk in sorted(heap, key=lambda e: e[1])]
  return sample, {"sentences_seen": seen, "chars_seen": seen_chars, "sentences_sampled": len(sample), "chars_sampled": n_chars}


def train(
    texts: Iterable[str],
    vocab_size: int,
    output: str | os.PathLike,
    max_sentences: int = 2_000_000,
    max_chars: int = 200_000_000,
    seed: int = 0,
    num_special_tokens: int = tokenizer_lib.DEFAULT_NUM_SPECIAL,
    num_threads: int | None = None,
    overwrite: bool = False,
    report: dict[str, Any] | None = None,
) -> dict:
  """Trains a tokenizer directory at `output` on a sample of `texts`; returns the training report (`report`'s
  entries, e.g. the inputs, plus what was sampled). `vocab_size` includes the specials."""
  named = len(tokenizer_lib.NAMED_SPECIALS)
  if num_special_tokens < named:
    raise ValueError(f"--num_special_tokens must be at least {named}")
  fixed = 1 + num_special_tokens + 256  # unk, specials, bytes
  if vocab_size <= fixed:
    raise ValueError(f"--vocab_size {vocab_size} leaves no room for BPE pieces: unk + {num_special_tokens} specials + 256 bytes = {fixed}")
  t0 = time.time()
  sentences, sampling = sample_sentences(texts, max_sentences, max_chars, seed)
  if not sentences:
    raise ValueError("no usable text in the inputs")
  t1 = time.time()
  specials = [*tokenizer_lib.NAMED_SPECIALS.values(), *map(tokenizer_lib.reserved_special, range(num_special_tokens - named))]
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=specials,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # our specials replace SentencePiece's <s> </s> <pad>
        character_coverage=0.9999,  # rarer characters fall back to bytes
        max_sentence_length=4 * CHUNK_CHARS + 16,  # bytes; chunks are at most CHUNK_CHARS characters
        input_sentence_size=0, shuffle_input_sentence=False,  # we sampled already
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"SentencePiece could not train a {vocab_size}-piece vocabulary on {len(sentences)} sentences: {e}") from None
  # User-defined symbols take the ids after unk, in order.
  special_ids = {name: 1 + i for i, name in enumerate(tokenizer_lib.NAMED_SPECIALS)}
  config = tokenizer_lib.config_for(vocab_size, special_ids, 1 + named, num_special_tokens - named)
  report = {**(report or {}), "seed": seed, "max_sentences": max_sentences, "max_chars": max_chars, **sampling,
            "sample_seconds": round(t1 - t0, 3), "train_seconds": round(time.time() - t1, 3)}
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    (tmp / tokenizer_lib.MODEL_FILE).write_bytes(model.getvalue())
    io_utils.write_json(tmp / tokenizer_lib.CONFIG_FILE, config)
    io_utils.write_json(tmp / tokenizer_lib.REPORT_FILE, report)
    tokenizer_lib.Tokenizer.load(tmp)  # checks that the ids in the config are the ones SentencePiece assigned
  return report
