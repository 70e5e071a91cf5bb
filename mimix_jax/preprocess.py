"""Raw text, conversations and preference pairs -> tokenized shards (data/preprocess.py does the work).

  python -m mimix_jax.preprocess --stage {pretrain,sft,dpo} --tokenizer TOKENIZER_OR_RUN_DIR --input PATH... \\
      --output SHARD_DIR --max_len N [--workers W] [--strict] [--pack] [--text_field F...] \\
      [--conversation_field F...] [--system_message TEXT] [--sample_ratio P --seed S]

Bad records are skipped, counted in manifest.json and the first few printed as `file:line: reason`; the run
fails (exit 1, one line on stderr, no output) only when nothing valid remains, or at the first bad record with
--strict. An interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from mimix_jax.data import preprocess, schemas
from mimix_jax.text.tokenizer import CONFIG_FILE


def parse_args(argv: Sequence[str]) -> preprocess.Options:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.preprocess", description=__doc__.split("\n\n")[0])
  p.add_argument("--stage", choices=list(preprocess.STAGES), required=True)
  p.add_argument("--tokenizer", required=True,
                 help="tokenizer directory (python -m mimix_jax.tokenizer), or a run directory: its tokenizer/ (an "
                      "imported model's tokenizer and chat template)")
  p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt .jsonl .json .csv .parquet, .gz)")
  p.add_argument("--output", required=True, help="shard directory to create")
  p.add_argument("--max_len", type=int, required=True, help="training sequence length; sequences store max_len + 1 tokens")
  p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
  p.add_argument("--strict", action="store_true", help="fail at the first bad record instead of skipping it")
  p.add_argument("--text_field", "--text_fields", nargs="+", default=list(schemas.TEXT_FIELDS), help="pretrain: record fields joined with a newline")
  p.add_argument("--conversation_field", "--conversation_fields", nargs="+", default=list(schemas.CONVERSATION_FIELDS),
                 help="sft: the first present field holds the messages")
  p.add_argument("--system_message", default=None, help="sft: system message for conversations without one")
  p.add_argument("--pack", action="store_true", help="sft: pack several conversations per sequence")
  p.add_argument("--sample_ratio", type=float, default=1.0, help="keep each record with this probability")
  p.add_argument("--seed", type=int, default=0, help="seeds --sample_ratio")
  p.add_argument("--shard_tokens", type=int, default=1 << 25, help="tokens per shard file (bounds memory)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  a = p.parse_args(argv)
  run_tokenizer = Path(a.tokenizer) / "tokenizer"  # where every run directory keeps its tokenizer
  tokenizer = str(run_tokenizer) if (run_tokenizer / CONFIG_FILE).is_file() else a.tokenizer
  return preprocess.Options(
      stage=a.stage, tokenizer=tokenizer, inputs=tuple(a.input), output=a.output, max_len=a.max_len,
      workers=a.workers, strict=a.strict, text_fields=tuple(a.text_field), conversation_fields=tuple(a.conversation_field),
      system_message=a.system_message, pack=a.pack, sample_ratio=a.sample_ratio, seed=a.seed,
      shard_tokens=a.shard_tokens, overwrite=a.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  o = parse_args(argv)
  try:
    m = preprocess.run(o, shlex.join(["python", "-m", "mimix_jax.preprocess", *argv]))
  except preprocess.PreprocessError as e:
    print(f"preprocess: error: {e}", file=sys.stderr)
    return 1
  for line in m["skipped_examples"]:
    print(f"preprocess: skipped {line}", file=sys.stderr)
  skipped = sum(m["skipped"].values())
  print(f"preprocess: {o.stage}: read {m['records_read']:,} records, wrote {m['records_written']:,}, skipped {skipped:,}"
        f"{' ' + str(m['skipped']) if skipped else ''}; {m['tokens']:,} tokens in {m['examples']:,} examples of <= {o.max_len + 1} tokens"
        f" ({len(m['shards'])} shards) -> {o.output} in {m['seconds']:.2f}s ({m['tokens'] / max(m['seconds'], 1e-9):,.0f} tokens/s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
