"""Train the tokenizer: `python -m mimix_jax.tokenizer --input PATH... --vocab_size N --output DIR`.

A SentencePiece BPE with byte fallback and the Llama-3 special tokens (text/tokenizer.py documents the id layout),
trained on a seeded sample of the inputs' text (text/training.py). Bad records are skipped and counted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mimix_jax.data import readers, schemas
from mimix_jax.text import tokenizer as tokenizer_lib, training


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.tokenizer", description="Train the SentencePiece BPE tokenizer.")
  p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt .jsonl .json .csv .parquet, .gz)")
  p.add_argument("--text_field", nargs="+", default=list(schemas.TEXT_FIELDS), help="record fields holding text (or message lists)")
  p.add_argument("--vocab_size", type=int, required=True, help="total ids, special tokens included")
  p.add_argument("--output", required=True, help="tokenizer directory to create")
  p.add_argument("--max_sentences", type=int, default=2_000_000, help="sample at most this many text chunks")
  p.add_argument("--max_chars", type=int, default=200_000_000, help="sample at most this many characters")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_special_tokens", type=int, default=tokenizer_lib.DEFAULT_NUM_SPECIAL, help="named + reserved special slots")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  try:
    paths = readers.discover(args.input)
    stats = {"inputs": [str(p) for p in paths], "text_fields": list(args.text_field), "files": len(paths)}
    texts = schemas.iter_texts(paths, args.text_field, stats, messages=True)
    r = training.train(texts, args.vocab_size, args.output, args.max_sentences, args.max_chars, args.seed,
                       args.num_special_tokens, overwrite=args.overwrite, report=stats)
  except (ValueError, OSError) as e:
    print(f"tokenizer: error: {e}", file=sys.stderr)
    return 1
  pct = 100.0 * r["chars_sampled"] / max(1, r["chars_seen"])
  skipped = sum(r["skipped"].values())
  print(f"tokenizer: sampled {r['sentences_sampled']:,} of {r['sentences_seen']:,} sentences ({r['chars_sampled']:,} chars, "
        f"{pct:.1f}%) from {r['files']} files ({skipped} bad records skipped{': ' + str(r['skipped']) if skipped else ''}); "
        f"trained {args.vocab_size} ids in {r['train_seconds']:.1f}s -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
