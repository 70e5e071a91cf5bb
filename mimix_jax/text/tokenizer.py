"""The tokenizer: SentencePiece BPE with byte fallback, Llama-3 special tokens and the Llama-3 chat template.

    tok = Tokenizer.load(DIR); tok.encode("text"); tok.encode_dialog_prompt(messages)

A tokenizer directory holds `tokenizer.model` (SentencePiece) and `tokenizer_config.json` (`config_for`: special
ids, vocabulary size, chat template name), plus `training_report.json` (what was sampled; not part of the hash).

Id layout (what SentencePiece assigns, fixed by the training options in text/training.py):
  0                 <unk> (never produced: byte fallback covers every character)
  1..6              <|begin_of_text|> <|end_of_text|> <|eot_id|> <|start_header_id|> <|end_header_id|> <|pad_id|>
  7..S-1            <|reserved_special_token_0|> ...   (S = --num_special_tokens + 1, default 257)
  S..S+255          the 256 byte pieces <0x00>..<0xFF>
  S+256..V-1        characters and BPE merges
`vocab_size` (V) counts everything above. The original puts its specials at the top (V-6..V-1) and pad at
V-1; nothing here depends on where they are, and export records the ids.

Text rules. Normalisation is the identity (no NFKC, no whitespace collapsing, no dummy prefix), so
decode(encode(s)) == s for any string. Specials are SentencePiece user-defined symbols, which SentencePiece
would match inside raw text; text is therefore cut between "<" and "|" before encoding (text/splitting.py), so
text typed by a user can never produce a control token. Only the chat template inserts them.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from mimix_jax import io_utils
from mimix_jax.text.splitting import META, split_for_encoding

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
DEFAULT_NUM_SPECIAL = 256  # named + reserved slots, as the original's num_reserved_special_tokens


def reserved_special(k: int) -> str:
  return f"<|reserved_special_token_{k}|>"


def config_for(vocab_size: int, special_ids: dict[str, int], first_reserved: int, n_reserved: int) -> dict[str, Any]:
  """tokenizer_config.json: the named specials' ids and the run of reserved ones (one schema for every writer)."""
  return {
      "tokenizer": "sentencepiece-bpe",
      "vocab_size": vocab_size,
      "chat_template": CHAT_TEMPLATE,
      "special_tokens": {name: [NAMED_SPECIALS[name], special_ids[name]] for name in NAMED_SPECIALS},
      "reserved_special_tokens": [first_reserved, n_reserved],
      "stop_ids": [special_ids["eos"], special_ids["eot"]],
      "byte_fallback": True,
      "normalization": "identity",
  }


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
      self.special_tokens[f"reserved_special_token_{k}"] = (reserved_special(k), first + k)
    self.bos_id = self.special_tokens["bos"][1]
    self.eos_id = self.special_tokens["eos"][1]
    self.eot_id = self.special_tokens["eot"][1]
    self.start_header_id = self.special_tokens["start_header"][1]
    self.end_header_id = self.special_tokens["end_header"][1]
    self.pad_id = self.special_tokens["pad"][1]
    self.stop_ids: tuple[int, ...] = tuple(config.get("stop_ids", (self.eos_id, self.eot_id)))
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

  # ----- the chat template (Llama 3) -----

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
    (no line breaks between the parts). Content is stripped of surrounding whitespace here as in training, so a
    trailing newline typed at a prompt gives the layout the model was trained on.
    """
    tokens, _, _ = self.encode_dialogs([messages], bos=bos)[0]
    return tokens.tolist() + self._header("assistant").tolist()

  def encode_dialog_and_targets(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Training sequence and loss mask for one conversation.

    tokens = [bos] + for each message: <|start_header_id|> role <|end_header_id|> \\n\\n content <|eot_id|>
    loss_mask[i] = 1 iff tokens[i] is assistant content or an assistant's <|eot_id|>, i.e. a token the model
    is trained to predict. The loader emits inputs = tokens[:-1], targets = tokens[1:], loss_mask = loss_mask[1:]:
    the same (input, target) pairs as the original's shifted x = tokens[:-1], targets[t] = tokens[t+1] where
    loss_mask[t+1], else ignored.
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


def stop_ids(tokenizer: Tokenizer, *extra: Iterable[int]) -> list[int]:
  """eos, eot and the tokenizer's configured stop ids, then any `extra` ids (a run's, a model's), in order."""
  return list(dict.fromkeys([tokenizer.eos_id, tokenizer.eot_id, *tokenizer.stop_ids,
                             *(int(i) for ids in extra for i in ids)]))
