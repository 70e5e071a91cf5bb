"""Where text is cut before sentencepiece encodes it: the one definition the tokenizer, the .txt reader (which
yields huge documents in parts) and the exported Hugging Face tokenizer's pre-tokenizer share.

SentencePiece's BPE slows down on very long strings, and it would match special-token strings inside raw text,
so the tokenizer encodes every piece between these cuts on its own. Each pattern's match END is a cut:
  PARAGRAPH_BREAK      after a blank line that is followed by text;
  SPECIAL_TOKEN_START  between "<" and "|", so no piece can spell a special token such as <|eot_id|>.
Paragraphs longer than CHUNK_CHARS are further cut at line ends (see split_for_encoding), and U+2581, which
SentencePiece uses for a space, stands alone so the tokenizer can encode it as its UTF-8 bytes.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterator

PARAGRAPH_BREAK = r"\n\r?\n(?=[^\r\n])"
SPECIAL_TOKEN_START = r"<(?=\|)"
CHUNK_CHARS = 2048  # longest string handed to SentencePiece at once (measured fastest at 1-2k chars)
META = "\u2581"  # SentencePiece's whitespace symbol: in input text it would decode as a space

_PARAGRAPH = re.compile(PARAGRAPH_BREAK)
_SPECIAL = re.compile(SPECIAL_TOKEN_START)
_META_ALONE = re.compile(f"({META})")


def split_for_encoding(text: str) -> list[str]:
  """Cuts text into the pieces SentencePiece encodes independently (see the module docstring).

  The cuts depend only on the text around them, so they are the same whether a document is encoded whole or
  in parts that end at paragraph breaks.
  """
  if len(text) <= CHUNK_CHARS and "\n\n" not in text and "\n\r\n" not in text and "<|" not in text and META not in text:
    return [text] if text else []
  out: list[str] = []
  for para in _cut_after(_PARAGRAPH, text):
    out.extend([para] if len(para) <= CHUNK_CHARS else _split_long(para))
  if "<|" in text:
    out = [p for piece in out for p in (_cut_after(_SPECIAL, piece) if "<|" in piece else (piece,))]
  if META in text:
    out = [p for piece in out for p in (_META_ALONE.split(piece) if META in piece else (piece,)) if p]
  return out


def _cut_after(pattern: re.Pattern, text: str) -> list[str]:
  """text cut at the end of every match of `pattern` (no empty pieces)."""
  cuts = [m.end() for m in pattern.finditer(text)]
  return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)]) if b > a]


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
