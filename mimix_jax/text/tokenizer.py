"""The tokenizer: one interface over three vocabularies (text/backends.py: our sentencepiece BPE, a Hugging Face
tokenizer.json, the original MimixLM's BPE rank file) and two chat templates (text/templates.py: ours, or the
model's Jinja template).

    tok = Tokenizer.load(DIR); tok.encode("text"); tok.encode_dialog_prompt(messages)

A tokenizer directory holds the backend's file (`tokenizer.model` or `tokenizer.json`) and `tokenizer_config.json`
("tokenizer": the backend, special ids, vocabulary size, "chat_template"), plus, for ours, `training_report.json`
(what was sampled; not part of the hash). `config_for` writes our own; hf/bpe.py writes imported ones.

Id layout of ours (what SentencePiece assigns, fixed by the training options in text/training.py):
  0                 <unk> (never produced: byte fallback covers every character)
  1..6              <|begin_of_text|> <|end_of_text|> <|eot_id|> <|start_header_id|> <|end_header_id|> <|pad_id|>
  7..S-1            <|reserved_special_token_0|> ...   (S = --num_special_tokens + 1, default 257)
  S..S+255          the 256 byte pieces <0x00>..<0xFF>
  S+256..V-1        characters and BPE merges
`vocab_size` (V) counts everything above. The original puts its specials at the top (V-6..V-1) and pad at
V-1; nothing here depends on where they are, and export records the ids. An imported model keeps its own ids;
roles it lacks fall back (eot to eos, pad to eos), and `vocab_size` is the model's (it may exceed the tokenizer's).

Text rules. Normalisation is the identity (no NFKC, no whitespace collapsing, no dummy prefix), so
decode(encode(s)) == s for any string. Text typed by a user can never produce a control token in any backend;
only the chat template inserts them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mimix_jax import io_utils
from mimix_jax.text import backends, templates
from mimix_jax.text.backends import reserved_special

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
  """A tokenizer directory. Ids are Python ints; batch methods return int32 numpy arrays."""

  def __init__(self, directory: str | os.PathLike, config: dict):
    directory = Path(directory)
    kind = config.get("tokenizer", "sentencepiece-bpe")
    if kind not in backends.BACKENDS:
      raise ValueError(f"{directory / CONFIG_FILE}: unknown tokenizer {kind!r} (one of {', '.join(backends.BACKENDS)})")
    self.directory, self.config = directory, config
    self.backend = backends.BACKENDS[kind](directory, config)
    self.model_path = str(self.backend.path)
    self.vocab_size: int = config["vocab_size"]
    if self.backend.size > self.vocab_size or (kind == "sentencepiece-bpe" and self.backend.size != self.vocab_size):
      raise ValueError(f"{self.model_path}: {self.backend.size} ids, but {CONFIG_FILE} says {self.vocab_size}")
    self.special_tokens: dict[str, tuple[str, int]] = {}
    for name, (string, idx) in config["special_tokens"].items():
      self.special_tokens[name] = (string, idx)
    first, n_reserved = config.get("reserved_special_tokens", (0, 0))
    for k in range(n_reserved):
      self.special_tokens[f"reserved_special_token_{k}"] = (reserved_special(k), first + k)
    for string, idx in config.get("other_special_tokens", {}).items():
      self.special_tokens[string] = (string, idx)
    for string, idx in self.special_tokens.values():
      if self.backend.token_id(string) != idx:
        raise ValueError(f"{self.model_path}: special token {string} is not id {idx} as {CONFIG_FILE} says")
    ids = {name: idx for name, (_, idx) in self.special_tokens.items()}
    self.bos_id: int | None = ids.get("bos")
    self.eos_id: int = ids["eos"]
    self.eot_id: int = ids.get("eot", self.eos_id)  # the end of a chat turn
    self.pad_id: int = ids.get("pad", self.eos_id)
    self.start_header_id: int | None = ids.get("start_header")
    self.end_header_id: int | None = ids.get("end_header")
    self.stop_ids: tuple[int, ...] = tuple(config.get("stop_ids", (self.eos_id, self.eot_id)))
    self._special_ids = frozenset(i for _, i in self.special_tokens.values())
    template = config.get("chat_template", CHAT_TEMPLATE)
    if template not in templates.TEMPLATES:
      raise ValueError(f"{directory / CONFIG_FILE}: unsupported chat template {template!r}")
    self.template = templates.TEMPLATES[template](self, config)

  @classmethod
  def load(cls, tokenizer_dir: str | os.PathLike) -> "Tokenizer":
    """The backend named by tokenizer_config.json's "tokenizer" field, reading the file it needs."""
    tokenizer_dir = Path(tokenizer_dir)
    config_path = tokenizer_dir / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    backend = backends.BACKENDS.get(config.get("tokenizer", "sentencepiece-bpe"))
    if not config or (backend and not all((tokenizer_dir / f).is_file() for f in backend.files)):
      raise FileNotFoundError(f"{tokenizer_dir} is not a tokenizer directory (needs {CONFIG_FILE} and "
                              f"{' or '.join(sorted({f for b in backends.BACKENDS.values() for f in b.files}))})")
    return cls(tokenizer_dir, config)

  def sha256(self) -> str:
    """Hash of the backend's files and tokenizer_config.json: equal hashes mean identical tokenization."""
    return io_utils.sha256_files([*(self.directory / f for f in self.backend.files), self.directory / CONFIG_FILE])

  def is_special(self, token_id: int) -> bool:
    return token_id in self._special_ids

  def id_to_piece(self, token_id: int) -> str:
    return self.backend.id_to_piece(int(token_id))

  def token_id(self, text: str) -> int | None:
    """The id of an added (special) token's text."""
    return self.backend.token_id(text)

  def added_texts(self) -> list[str]:
    """The texts that are control tokens when a chat template writes them: our specials and the model's added ones."""
    return list({*(s for s, _ in self.special_tokens.values()), *self.backend.added})

  # ----- plain text -----

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of plain text; special-token strings inside `text` are encoded as ordinary text."""
    ids, _ = self.encode_many([text])
    head = [self.bos_id] if bos and self.bos_id is not None and self.config.get("add_bos", True) else []
    return head + ids.tolist() + [self.eos_id] * eos

  def encode_many(self, texts: Sequence[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All texts encoded in one backend call: (ids int32 [sum(lengths)], lengths int64 [len(texts)]).

    Text i's ids are ids[offsets[i]:offsets[i+1]] with offsets = [0, *cumsum(lengths)]. Same ids as `encode`.
    """
    return self.backend.encode_many(texts, num_threads=num_threads)

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens are dropped when `skip_special`, else rendered as their strings."""
    ids = [int(i) for i in ids]
    if skip_special:
      ids = [i for i in ids if i not in self._special_ids]
    return self.backend.decode(ids)

  # ----- the chat template (text/templates.py) -----

  def encode_dialog_prompt(self, messages: Sequence[dict], bos: bool = True) -> list[int]:
    """Generation prompt: the messages, then what opens the assistant's turn. With ours, token-wise

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    (no line breaks between the parts). Content is stripped of surrounding whitespace here as in training, so a
    trailing newline typed at a prompt gives the layout the model was trained on. bos=False leaves out the
    leading bos (a later turn of a conversation).
    """
    return self.template.prompt(messages, bos)

  def end_of_turn(self) -> list[int]:
    """The ids that close an assistant's reply in the chat format (ours: <|eot_id|>), for a chat's history."""
    return self.template.end_of_turn()

  def encode_dialog_and_targets(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Training sequence and loss mask for one conversation.

    With ours: tokens = [bos] + for each message: <|start_header_id|> role <|end_header_id|> \\n\\n content <|eot_id|>
    loss_mask[i] = 1 iff tokens[i] is assistant content or an assistant's <|eot_id|>, i.e. a token the model
    is trained to predict (with a model's template: the assistant turn as the template renders it). The loader
    emits inputs = tokens[:-1], targets = tokens[1:], loss_mask = loss_mask[1:]: the same (input, target) pairs
    as the original's shifted x = tokens[:-1], targets[t] = tokens[t+1] where loss_mask[t+1], else ignored.
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
    it to train only the final completion. ends[j] is the index just past message j (its <|eot_id|>).
    """
    return self.template.encode_dialogs(dialogs, loss_on, bos, num_threads)


class StreamDecoder:
  """Turns generated ids into text increments, holding back bytes of an unfinished UTF-8 character.

  With byte fallback a character outside the vocabulary arrives as several <0xNN> pieces (with a byte-level BPE,
  pieces may end inside a character); decoding them one by one would print replacement characters. push(id) returns the newly completed text ('' if none yet).
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
    tail = b""
    for token_id in reversed(self._pending):
      piece = self._tok.backend.token_bytes(token_id)
      if piece is None:
        break
      tail = piece + tail
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
