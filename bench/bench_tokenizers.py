"""Tokenizer backends side by side: our Tokenizer over each backend vs the library it wraps, on the same text.

    python bench/bench_tokenizers.py [--vocab_size 8000] [--chars 2000000] [--json results.jsonl]

  encode      tokens per second of Tokenizer.encode_many on the shipped corpus (documents one per text, as
              preprocess hands them over, one thread) for: sentencepiece (ours, trained by mimix_jax.tokenizer),
              tokenizer.json (a byte-level BPE trained with `tokenizers`, Llama 3's regex) and the original's rank
              file (the same BPE written as one, encoded by tiktoken); next to the bare library on the same
              texts (sentencepiece, transformers' PreTrainedTokenizerFast, tiktoken) and the ratio ours / bare.
  dialogs     SFT conversations per second of encode_dialogs (the shipped chatterbot data): our llama3 template
              (from ids) vs the model's Jinja template (rendered once per prefix, to find the loss spans), and
              transformers' apply_chat_template (ids only, no mask) for the Jinja one.
Prints a Markdown table; --json appends one JSON object per row. Best of 3 timings each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import bpe_models  # noqa: E402  (the test builders: the same BPE, template and folder layout)
from mimix_jax import tokenizer as tokenizer_cmd  # noqa: E402
from mimix_jax.data import readers, schemas  # noqa: E402
from mimix_jax.hf import bpe as hf_bpe  # noqa: E402
from mimix_jax.text import backends  # noqa: E402
from mimix_jax.text.tokenizer import Tokenizer  # noqa: E402


def best(fn, n: int = 3) -> float:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def corpus_texts(chars: int) -> list[str]:
  texts, total = [], 0
  for path in sorted((REPO / "data" / "corpus" / "train").glob("*.txt.gz")):
    for para in gzip.open(path, "rt", encoding="utf-8").read().split("\n\n"):
      texts.append(para)
      total += len(para)
      if total >= chars:
        return texts
  return texts


def dialogs(n: int) -> list[list[dict]]:
  paths = readers.discover([str(REPO / "data" / "chat" / "sft" / "chatterbot_en.jsonl.gz")])
  out = []
  for item in readers.iter_items(paths[0]):
    out.append(schemas.conversation_of(readers.parse(item)))
    if len(out) == n:
      break
  return out


def build(work: Path, vocab: int) -> dict[str, tuple[Tokenizer, object]]:
  """name -> (our Tokenizer, the bare library's encode of a list of texts)."""
  import sentencepiece as spm
  import tiktoken
  import transformers

  tokenizer_cmd.main(["--input", str(REPO / "data" / "corpus" / "train"), "--vocab_size", str(vocab), "--output",
                      str(work / "sp")])
  sp = spm.SentencePieceProcessor(model_file=str(work / "sp" / "tokenizer.model"))
  tk = bpe_models.train_bpe(vocab)
  hf_tok = bpe_models.save_hf_model(work / "hf", tk)
  json_tok = hf_bpe.write_tokenizer_json_dir(work / "hf", work / "json_tok", len(hf_tok))
  bpe_models.save_mimixlm_folder(work / "mimixlm", tk, work / "hf")
  config = json.loads((work / "mimixlm" / "model_config.json").read_text())
  rank_tok = hf_bpe.write_rank_file_dir(work / "mimixlm", config["tokenizer_config"], work / "rank_tok", len(hf_tok))
  tc = config["tokenizer_config"]
  enc = tiktoken.Encoding("bench", pat_str=tc["pat_str"],
                          mergeable_ranks=backends.read_rank_file(work / "mimixlm" / "tokenizer.model"),
                          special_tokens={t: i for t, i in tc["special_tokens"].values()})
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(work / "hf")
  return {
      "sentencepiece": (Tokenizer.load(work / "sp"), lambda texts: sp.encode(texts)),
      "tokenizer.json": (json_tok, lambda texts: fast(texts, add_special_tokens=False)["input_ids"]),
      "rank file": (rank_tok, lambda texts: enc.encode_ordinary_batch(texts, num_threads=1)),
  }, hf_tok


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab_size", type=int, default=8000)
  p.add_argument("--chars", type=int, default=2_000_000)
  p.add_argument("--dialogs", type=int, default=500)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  texts, convs = corpus_texts(args.chars), dialogs(args.dialogs)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    toks, hf_tok = build(Path(tmp), args.vocab_size)
    for name, (tok, bare) in toks.items():
      n = int(tok.encode_many(texts)[1].sum())
      ours, theirs = best(lambda: tok.encode_many(texts)), best(lambda: bare(texts))
      rows.append({"bench": "tokenizer_encode", "backend": name, "tokens": n, "ours_tokens_per_s": round(n / ours),
                   "bare_tokens_per_s": round(n / theirs), "ratio": round(theirs / ours, 3)})
    for name, tok in (("llama3 (ours)", toks["rank file"][0]), ("jinja (model's)", toks["tokenizer.json"][0])):
      t = best(lambda: tok.encode_dialogs(convs))
      rows.append({"bench": "dialog_encode", "template": name, "dialogs": len(convs),
                   "ours_dialogs_per_s": round(len(convs) / t, 1)})
    t = best(lambda: [hf_tok.apply_chat_template(c, tokenize=True) for c in convs])
    rows[-1].update(apply_chat_template_dialogs_per_s=round(len(convs) / t, 1))
  print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{len(texts)} texts, {args.chars:,} chars, vocab {args.vocab_size}")
  print("| row | ours | bare library | ours / bare |\n|---|---|---|---|")
  for r in rows:
    if r["bench"] == "tokenizer_encode":
      print(f"| encode, {r['backend']} | {r['ours_tokens_per_s']:,} tok/s | {r['bare_tokens_per_s']:,} tok/s | "
            f"{r['ratio']} |")
    else:
      ref = r.get("apply_chat_template_dialogs_per_s")
      print(f"| dialogs, {r['template']} | {r['ours_dialogs_per_s']} /s | {f'{ref} /s' if ref else '-'} | "
            f"{round(r['ours_dialogs_per_s'] / ref, 3) if ref else '-'} |")
  if args.json:
    with open(args.json, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
