"""SentencePiece BPE tokenizer with byte fallback, Llama-3 special tokens and chat template.

Train:  python -m mimix_jax.tokenizer --input PATH... [--text_field NAME ...] --vocab_size N --output DIR
Use:    tok = Tokenizer.load(DIR); tok.encode("text"); tok.encode_dialog_prompt(messages)

The tokenizer directory holds `tokenizer.model` (SentencePiece) and `tokenizer_config.json` (special ids,
vocabulary size, chat template name), plus `training_report.json` (what was sampled; not part of the hash).

Id layout (what SentencePiece assigns, fixed by the training options below):
  0                 <unk> (never produced: byte fallback covers every character)
  1..6              <|begin_of_text|> <|end_of_text|> <|eot_id|> <|start_header_id|> <|end_header_id|> <|pad_id|>
  7..S-1            <|reserved_special_token_0|> ...   (S = --num_special_tokens + 1, default 257)
  S..S+255          the 256 byte pieces <0x00>..<0xFF>
  S+256..V-1        characters and BPE merges
`vocab_size` (V) counts everything above. The reference puts its specials at the top (V-6..V-1) and pad at
V-1; nothing here depends on where they are, and export records the ids.

Text rules. Normalisation is the identity (no NFKC, no whitespace collapsing, no dummy prefix), so
decode(encode(s)) == s for any string. Specials are SentencePiece user-defined symbols, which SentencePiece
would match inside raw text; `encode` therefore cuts every "<|" between its two characters before encoding,
so text typed by a user can never produce a control token. Only the chat template inserts them.
Long texts are encoded in chunks (see `split_for_encoding`) because SentencePiece's BPE slows down on very
long strings; chunks end at paragraph breaks, so encoding a document in paragraph-aligned parts gives the
same ids as encoding it whole.
"""

from __future__ import annotations

import argparse
import heapq
import io
import itertools
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from mimix_jax import io_utils
from mimix_jax.data import readers, schemas

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
REPORT_FILE = "training_report.json"
CHAT_TEMPLATE = "llama3"

NAMED_SPECIALS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "eot": "<|eot_id|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "pad": "<|pad_id|>",
}
DEFAULT_NUM_SPECIAL = 256  # named + reserved slots, as the reference's num_reserved_special_tokens

CHUNK_CHARS = 2048  # longest string handed to SentencePiece at once (measured fastest at 1-2k chars)
_PARAGRAPH_END = re.compile(r"\n\r?\n(?=[^\r\n])")  # a blank line followed by text: cut after the blank line
_SPECIAL_START = re.compile(r"(?<=<)(?=\|)")  # between "<" and "|"
META = "\u2581"  # SentencePiece's whitespace symbol: in input text it would decode as a space
_META_ALONE = re.compile(f"({META})")


def split_for_encoding(text: str) -> list[str]:
  """Cuts text into the pieces SentencePiece encodes independently.

  1. after every blank line that is followed by text (paragraph breaks);
  2. paragraphs longer than CHUNK_CHARS at line ends, greedily; single longer lines before a space, or hard;
  3. between "<" and "|", so no piece contains a special-token string;
  4. around each U+2581 (SentencePiece's space symbol), which `encode_many` then encodes as its UTF-8 bytes.
  The cuts depend only on the text around them, so they are the same whether a document is encoded whole or
  in parts that end at paragraph breaks.
  """
  if len(text) <= CHUNK_CHARS and "\n\n" not in text and "\n\r\n" not in text and "<|" not in text and META not in text:
    return [text] if text else []
  out: list[str] = []
  start = 0
  for m in itertools.chain(_PARAGRAPH_END.finditer(text), (None,)):
    end = m.end() if m else len(text)
    para = text[start:end]
    start = end
    if not para:
      continue
    if len(para) <= CHUNK_CHARS:
      out.append(para)
    else:
      out.extend(_split_long(para))
  if "<|" in text:
    out = [p for piece in out for p in (_SPECIAL_START.split(piece) if "<|" in piece else (piece,))]
  if META in text:
    out = [p for piece in out for p in (_META_ALONE.split(piece) if META in piece else (piece,)) if p]
  return out


def _split_long(para: str) -> Iterator[str]:
  """Greedy groups of whole lines of at most CHUNK_CHARS; a longer line is cut before a space or hard."""
  group, size = [], 0
  for line in para.splitlines(keepends=True):
    while len(line) > CHUNK_CHARS:
      if group:
        yield "".join(group)
        group, size = [], 0
      cut = line.rfind(" ", 1, CHUNK_CHARS)
      cut = cut if cut > 0 else CHUNK_CHARS
      yield line[:cut]
      line = line[cut:]
    if size + len(line) > CHUNK_CHARS and group:
      yield "".join(group)
      group, size = [], 0
    group.append(line)
    size += len(line)
  if group:
    yield "".join(group)


class Tokenizer:
  """A trained tokenizer directory. Ids are Python ints; batch methods return int32 numpy arrays."""

  def __init__(self, model_path: str | os.PathLike, config: dict):
    self.model_path = str(model_path)
    self.config = config
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size: int = self._sp.get_piece_size()
    if self.vocab_size != config["vocab_size"]:
      raise ValueError(f"{self.model_path}: {self.vocab_size} pieces, but {CONFIG_FILE} says {config['vocab_size']}")
    self.special_tokens: dict[str, tuple[str, int]] = {}
    for name, (string, idx) in config["special_tokens"].items():
      if self._sp.piece_to_id(string) != idx:
        raise ValueError(f"{self.model_path}: special token {string} is not id {idx} as {CONFIG_FILE} says")
      self.special_tokens[name] = (string, idx)
    first, n_reserved = config["reserved_special_tokens"]
    for k in range(n_reserved):
      self.special_tokens[f"reserved_special_token_{k}"] = (f"<|reserved_special_token_{k}|>", first + k)
    self.bos_id = self.special_tokens["bos"][1]
    self.eos_id = self.special_tokens["eos"][1]
    self.eot_id = self.special_tokens["eot"][1]
    self.start_header_id = self.special_tokens["start_header"][1]
    self.end_header_id = self.special_tokens["end_header"][1]
    self.pad_id = self.special_tokens["pad"][1]
    self.stop_ids: tuple[int, int] = (self.eos_id, self.eot_id)
    self._special_ids = frozenset(i for _, i in self.special_tokens.values())
    self._headers: dict[str, np.ndarray] = {}
    self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]

  @classmethod
  def load(cls, tokenizer_dir: str | os.PathLike) -> "Tokenizer":
    tokenizer_dir = Path(tokenizer_dir)
    config_path, model_path = tokenizer_dir / CONFIG_FILE, tokenizer_dir / MODEL_FILE
    if not config_path.is_file() or not model_path.is_file():
      raise FileNotFoundError(f"{tokenizer_dir} is not a tokenizer directory (needs {MODEL_FILE} and {CONFIG_FILE})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("chat_template") != CHAT_TEMPLATE:
      raise ValueError(f"{config_path}: unsupported chat template {config.get('chat_template')!r}")
    return cls(model_path, config)

  def sha256(self) -> str:
    """Hash of tokenizer.model and tokenizer_config.json: equal hashes mean identical tokenization."""
    d = Path(self.model_path).parent
    return io_utils.sha256_files([d / MODEL_FILE, d / CONFIG_FILE])

  def is_special(self, token_id: int) -> bool:
    return token_id in self._special_ids

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  # ----- plain text -----

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of plain text; special-token strings inside `text` are encoded as ordinary text."""
    ids, _ = self.encode_many([text])
    return [self.bos_id] * bos + ids.tolist() + [self.eos_id] * eos

  def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All texts encoded in one SentencePiece call: (ids int32 [sum(lengths)], lengths int64 [len(texts)]).

    Text i's ids are ids[offsets[i]:offsets[i+1]] with offsets = [0, *cumsum(lengths)]. Same ids as `encode`.
    """
    chunks: list[str] = []
    counts = np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
      pieces = split_for_encoding(text)
      chunks.extend(pieces)
      counts[i] = len(pieces)
    encoded = self._sp.encode(chunks, num_threads=num_threads) if chunks else []
    if any(META in t for t in texts):
      encoded = [self._meta_ids if c == META else e for c, e in zip(chunks, encoded)]
    chunk_lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(chunk_lens.sum()))
    # Per-text lengths: sums of consecutive runs of `counts` chunk lengths.
    ends = np.cumsum(np.concatenate([[0], chunk_lens]))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return ids, ends[bounds[1:]] - ends[bounds[:-1]]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens are dropped when `skip_special`, else rendered as their strings."""
    ids = [int(i) for i in ids]
    if skip_special:
      ids = [i for i in ids if i not in self._special_ids]
    return self._sp.decode(ids)

  # ----- chat template (Llama 3, spec §3.4) -----

  def _header(self, role: str) -> np.ndarray:
    """<|start_header_id|> role <|end_header_id|> "\\n\\n"."""
    if role not in self._headers:
      ids = [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]
      self._headers[role] = np.asarray(ids, np.int32)
    return self._headers[role]

  def encode_dialog_prompt(self, messages: Sequence[dict], bos: bool = True) -> list[int]:
    """Generation prompt: [bos] + each message + the assistant header, i.e. token-wise

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    (no line breaks between the parts). Content is stripped of surrounding whitespace, as in training (the
    reference strips only in training, so a trailing newline typed at the prompt produced an unseen layout).
    """
    tokens, _, _ = self.encode_dialogs([messages], bos=bos)[0]
    return tokens.tolist() + self._header("assistant").tolist()

  def encode_dialog_and_targets(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Training sequence and loss mask for one conversation.

    tokens = [bos] + for each message: <|start_header_id|> role <|end_header_id|> \\n\\n content <|eot_id|>
    loss_mask[i] = 1 iff tokens[i] is assistant content or an assistant's <|eot_id|>, i.e. a token the model
    is trained to predict. Mapping to the reference's shifted pair (x, targets): x = tokens[:-1] and
    targets[t] = tokens[t+1] if loss_mask[t+1] else pad (ignored); our loader emits inputs = tokens[:-1],
    targets = tokens[1:], loss_mask = loss_mask[1:], which trains on exactly the same (input, target) pairs.
    """
    tokens, mask, _ = self.encode_dialogs([messages])[0]
    return tokens.tolist(), mask.tolist()

  def encode_dialogs(
      self,
      dialogs: Sequence[Sequence[dict]],
      loss_on: Sequence[Sequence[bool]] | None = None,
      bos: bool = True,
      num_threads: int = 1,
  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batched `encode_dialog_and_targets`: per dialog (tokens int32 [n], loss_mask uint8 [n], ends int64 [m]).

    loss_on[d][j] says whether message j of dialog d is trained on (default: role == "assistant"); DPO uses
    it to train only the final completion. ends[j] is the index just past message j's <|eot_id|>.
    """
    contents = [m["content"].strip() for d in dialogs for m in d]
    ids, lengths = self.encode_many(contents, num_threads=num_threads)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    eot = np.asarray([self.eot_id], np.int32)
    out, k = [], 0
    for d, dialog in enumerate(dialogs):
      parts, masks = ([np.asarray([self.bos_id], np.int32)], [np.zeros(1, np.uint8)]) if bos else ([], [])
      ends = np.empty(len(dialog), np.int64)
      n = int(bos)
      for j, m in enumerate(dialog):
        header = self._header(m["role"])
        content = ids[offsets[k] : offsets[k + 1]]
        k += 1
        train = loss_on[d][j] if loss_on is not None else m["role"] == "assistant"
        parts += [header, content, eot]
        masks += [np.zeros(len(header), np.uint8), np.full(len(content) + 1, int(train), np.uint8)]
        n += len(header) + len(content) + 1
        ends[j] = n
      tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
      out.append((tokens, np.concatenate(masks) if masks else np.zeros(0, np.uint8), ends))
    return out


class StreamDecoder:
  """Turns generated ids into text increments, holding back bytes of an unfinished UTF-8 character.

  With byte fallback a character outside the vocabulary arrives as several <0xNN> pieces; decoding them one
  by one would print replacement characters. push(id) returns the newly completed text ('' if none yet).
  """

  def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
    self._tok = tokenizer
    self._skip_special = skip_special
    self._pending: list[int] = []

  def push(self, token_id: int) -> str:
    token_id = int(token_id)
    if self._skip_special and self._tok.is_special(token_id):
      return ""
    self._pending.append(token_id)
    if self._incomplete():
      return ""
    return self.flush()

  def flush(self) -> str:
    """Everything still held back (an unfinished character decodes to U+FFFD)."""
    text = self._tok.decode(self._pending, skip_special=False)
    self._pending = []
    return text

  def _incomplete(self) -> bool:
    """Do the trailing byte pieces form the start of a multi-byte UTF-8 character?"""
    tail = bytearray()
    for token_id in reversed(self._pending):
      piece = self._tok.id_to_piece(token_id)
      if not (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")):
        break
      tail.insert(0, int(piece[3:5], 16))
    if not tail:
      return False
    try:
      tail.decode("utf-8")
      return False
    except UnicodeDecodeError as e:
      return e.reason == "unexpected end of data"


# ----- training -----


def _training_text(record, fields: Sequence[str]) -> str:
  """Text of a record for tokenizer training: text fields, or the contents of a message-list field."""
  if isinstance(record, dict):
    lists = [record[f] for f in fields if isinstance(record.get(f), list)]
    if lists:
      return "\n".join(m["content"] for value in lists for m in schemas.messages_of(value, fields[0]))
  return schemas.text_of(record, fields)


def iter_training_texts(paths: Sequence[Path], fields: Sequence[str], stats: dict) -> Iterator[str]:
  """Texts of all records in `paths`; bad records are counted in stats["skipped"] and skipped."""
  skipped = stats.setdefault("skipped", {})
  for path in paths:
    for item in readers.iter_items(path, columns=fields):
      stats["records"] = stats.get("records", 0) + item.first  # later parts of a .txt document are not new records
      try:
        if item.kind == "error":
          raise readers.RecordError(*item.payload)
        if item.kind == "text":
          text, bad = readers.decode_text(item)
          for _, reason, _ in bad:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
          text = _training_text(readers.parse(item), fields)
      except readers.RecordError as e:
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        if len(stats.setdefault("skipped_examples", [])) < 5:
          stats["skipped_examples"].append(f"{item.loc}: {e}")
        continue
      yield text


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
    inputs: Sequence[str],
    vocab_size: int,
    output: str | os.PathLike,
    text_fields: Sequence[str] = schemas.TEXT_FIELDS,
    max_sentences: int = 2_000_000,
    max_chars: int = 200_000_000,
    seed: int = 0,
    num_special_tokens: int = DEFAULT_NUM_SPECIAL,
    num_threads: int | None = None,
    overwrite: bool = False,
) -> dict:
  """Trains a tokenizer directory at `output`; returns the training report. `vocab_size` includes specials."""
  if num_special_tokens < len(NAMED_SPECIALS):
    raise ValueError(f"--num_special_tokens must be at least {len(NAMED_SPECIALS)}")
  fixed = 1 + num_special_tokens + 256  # unk, specials, bytes
  if vocab_size <= fixed:
    raise ValueError(f"--vocab_size {vocab_size} leaves no room for BPE pieces: unk + {num_special_tokens} specials + 256 bytes = {fixed}")
  paths = readers.discover(inputs)
  t0 = time.time()
  stats: dict = {"files": len(paths)}
  sentences, sampling = sample_sentences(iter_training_texts(paths, text_fields, stats), max_sentences, max_chars, seed)
  stats.update(sampling)
  if not sentences:
    raise ValueError(f"no usable text in {', '.join(map(str, inputs))} (fields {list(text_fields)}; skipped: {stats['skipped']})")
  t1 = time.time()
  specials = list(NAMED_SPECIALS.values()) + [f"<|reserved_special_token_{k}|>" for k in range(num_special_tokens - len(NAMED_SPECIALS))]
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
  config = {
      "tokenizer": "sentencepiece-bpe",
      "vocab_size": vocab_size,
      "chat_template": CHAT_TEMPLATE,
      "special_tokens": {name: [s, 1 + i] for i, (name, s) in enumerate(NAMED_SPECIALS.items())},
      "reserved_special_tokens": [1 + len(NAMED_SPECIALS), num_special_tokens - len(NAMED_SPECIALS)],
      "stop_ids": [1 + list(NAMED_SPECIALS).index("eos"), 1 + list(NAMED_SPECIALS).index("eot")],
      "byte_fallback": True,
      "normalization": "identity",
  }
  report = {
      "inputs": [str(p) for p in paths],
      "text_fields": list(text_fields),
      "seed": seed,
      "max_sentences": max_sentences,
      "max_chars": max_chars,
      **stats,
      "sample_seconds": round(t1 - t0, 3),
      "train_seconds": round(time.time() - t1, 3),
  }
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    (tmp / MODEL_FILE).write_bytes(model.getvalue())
    io_utils.write_json(tmp / CONFIG_FILE, config)
    io_utils.write_json(tmp / REPORT_FILE, report)
    Tokenizer.load(tmp)  # checks that the ids in the config are the ones SentencePiece assigned
  return report


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.tokenizer", description="Train the SentencePiece BPE tokenizer.")
  p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt .jsonl .json .csv .parquet, .gz)")
  p.add_argument("--text_field", nargs="+", default=list(schemas.TEXT_FIELDS), help="record fields holding text (or message lists)")
  p.add_argument("--vocab_size", type=int, required=True, help="total ids, special tokens included")
  p.add_argument("--output", required=True, help="tokenizer directory to create")
  p.add_argument("--max_sentences", type=int, default=2_000_000, help="sample at most this many text chunks")
  p.add_argument("--max_chars", type=int, default=200_000_000, help="sample at most this many characters")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_special_tokens", type=int, default=DEFAULT_NUM_SPECIAL, help="named + reserved special slots")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  try:
    r = train(args.input, args.vocab_size, args.output, args.text_field, args.max_sentences, args.max_chars,
              args.seed, args.num_special_tokens, overwrite=args.overwrite)
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
