"""The vocabularies behind the one Tokenizer (text/tokenizer.py): sentencepiece, a Hugging Face tokenizer.json,
and the original MimixLM's BPE rank file (tiktoken-style).

Every backend encodes plain text with special-token strings treated as ordinary text (only a chat template
inserts control tokens), decodes ids with specials rendered as their strings, says which bytes an id stands
for when it is a byte-level piece (so streaming decode can hold back an unfinished UTF-8 character), and lists
its added tokens (`added`: text -> id, beyond the config's specials; a chat template's output is cut at them).
tokenizer_config.json's "tokenizer" field names the backend (BACKENDS); each lists the files it reads (`files`).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mimix_jax.text.splitting import META, split_for_encoding

TOKENIZER_JSON = "tokenizer.json"
RANK_FILE = "tokenizer.model"  # the original names its rank file like a sentencepiece model
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level character -> byte (printable bytes map to themselves, the rest to U+0100 onwards)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
  chars, n = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


def concat(encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Per-text id lists -> (ids int32 [sum(lengths)], lengths int64 [len(encoded)])."""
  lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
  return np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths


class SentencePieceBackend:
  """Our trained tokenizer.model. Specials are user-defined symbols, which sentencepiece would match inside raw
  text, so text is cut between "<" and "|" first (text/splitting.py)."""

  name = "sentencepiece-bpe"
  files = ("tokenizer.model",)

  def __init__(self, directory: Path, config: dict[str, Any]):
    import sentencepiece as spm

    self.path = directory / self.files[0]
    self.added: dict[str, int] = {}  # the specials are user-defined pieces, all in the config
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self.size = self._sp.get_piece_size()
    self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]
    self._bytes = [self._piece_bytes(self._sp.id_to_piece(i)) for i in range(self.size)]

  @staticmethod
  def _piece_bytes(piece: str) -> bytes | None:
    m = BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else None

  def token_id(self, text: str) -> int | None:
    idx = self._sp.piece_to_id(text)
    return idx if self._sp.id_to_piece(idx) == text else None

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def token_bytes(self, token_id: int) -> bytes | None:
    return self._bytes[token_id] if 0 <= token_id < self.size else None

  def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    chunks: list[str] = []
    counts = np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
      pieces = split_for_encoding(text)
      chunks.extend(pieces)
      counts[i] = len(pieces)
    encoded = self._sp.encode(chunks, num_threads=num_threads) if chunks else []
    if any(META in t for t in texts):
      encoded = [self._meta_ids if c == META else e for c, e in zip(chunks, encoded)]
    ids, chunk_lens = concat(encoded)
    # Per-text lengths: sums of consecutive runs of `counts` chunk lengths.
    ends = np.cumsum(np.concatenate([[0], chunk_lens]))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return ids, ends[bounds[1:]] - ends[bounds[:-1]]

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


class TokenizerJsonBackend:
  """A Hugging Face tokenizer.json (byte-level BPE as Llama 3 and SmolLM ship it, or any other model type) through
  the `tokenizers` library, encoding as transformers' fast tokenizer with split_special_tokens=True."""

  name = "tokenizer.json"
  files = (TOKENIZER_JSON,)

  def __init__(self, directory: Path, config: dict[str, Any]):
    from tokenizers import Tokenizer as HFTokenizer

    self.path = directory / TOKENIZER_JSON
    self._tk = HFTokenizer.from_file(str(self.path))
    self._tk.encode_special_tokens = True  # specials typed in text stay text
    self.size = self._tk.get_vocab_size(with_added_tokens=True)
    spec = json.loads(self.path.read_text(encoding="utf-8"))
    self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    alphabet = byte_level_alphabet()
    added_ids = set(self.added.values())
    self._bytes: dict[int, bytes | None] = {}
    for piece, i in self._tk.get_vocab(with_added_tokens=False).items():
      if i in added_ids:
        continue
      m = BYTE_PIECE.fullmatch(piece)
      if self.byte_level and all(c in alphabet for c in piece):
        self._bytes[i] = bytes(alphabet[c] for c in piece)
      elif m:
        self._bytes[i] = bytes([int(m.group(1), 16)])

  def token_id(self, text: str) -> int | None:
    return self._tk.token_to_id(text)

  def id_to_piece(self, token_id: int) -> str:
    return self._tk.id_to_token(int(token_id)) or ""

  def token_bytes(self, token_id: int) -> bytes | None:
    return self._bytes.get(token_id)

  def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    encoded = self._tk.encode_batch(list(texts), add_special_tokens=False) if texts else []
    return concat([e.ids for e in encoded])

  def decode(self, ids: list[int]) -> str:
    return self._tk.decode(ids, skip_special_tokens=False)


def read_rank_file(path: Path) -> dict[bytes, int]:
  """The original's tokenizer.model: lines `base64(token bytes) rank`; lines starting with # are skipped."""
  ranks = {}
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip() or line.startswith("#"):
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
      raise ValueError(f"{path}:{n}: expected 'base64(token bytes) rank' (the original's BPE rank file)") from None
  return ranks


def write_rank_file(path: Path, ranks: dict[bytes, int]) -> None:
  lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
  path.write_text("".join(lines), encoding="utf-8")


class RankFileBackend:
  """The original's BPE (tokenizer "bpe"): a rank file, its pat_str regex and the config's specials, encoded by
  tiktoken as the original does with use_tiktoken (its pure-Python BPE gives the same ids)."""

  name = "bpe"
  files = (RANK_FILE,)

  def __init__(self, directory: Path, config: dict[str, Any]):
    try:
      import tiktoken
    except ImportError:
      raise RuntimeError(f"{directory}: the original's BPE rank file needs tiktoken (pinned in requirements.lock: "
                         "make venv, or pip install tiktoken)") from None

    self.path = directory / RANK_FILE
    ranks = read_rank_file(self.path)
    specials = {text: idx for text, idx in all_specials(config)}
    self._enc = tiktoken.Encoding(name=directory.name or "mimixlm", pat_str=config["pat_str"],
                                  mergeable_ranks=ranks, special_tokens=specials)
    self._specials = self.added = specials
    self._special_ids = set(specials.values())
    self.size = max([*ranks.values(), *specials.values()]) + 1

  def token_id(self, text: str) -> int | None:
    return self._specials.get(text)

  def id_to_piece(self, token_id: int) -> str:
    return self._enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

  def token_bytes(self, token_id: int) -> bytes | None:
    if token_id in self._special_ids:
      return None
    try:
      return self._enc.decode_single_token_bytes(token_id)
    except KeyError:
      return None

  def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return concat(self._enc.encode_ordinary_batch(list(texts), num_threads=max(1, num_threads)))

  def decode(self, ids: list[int]) -> str:
    return self._enc.decode(ids, errors="replace")


def reserved_special(k: int) -> str:
  return f"<|reserved_special_token_{k}|>"


def all_specials(config: dict[str, Any]) -> Iterable[tuple[str, int]]:
  """(text, id) of the named specials, the run of reserved ones and any other added specials of the config."""
  for text, idx in config["special_tokens"].values():
    yield text, idx
  first, n_reserved = config.get("reserved_special_tokens", (0, 0))
  for k in range(n_reserved):
    yield reserved_special(k), first + k
  yield from ((text, idx) for text, idx in config.get("other_special_tokens", {}).items())


BACKENDS = {b.name: b for b in (SentencePieceBackend, TokenizerJsonBackend, RankFileBackend)}
