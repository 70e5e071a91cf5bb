"""Our sentencepiece tokenizer as a Hugging Face tokenizer (tokenizer.json: the same ids through `tokenizers`,
and the chat template in Jinja that renders our training format), and back (a model directory's tokenizer.model
as our tokenizer directory).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mimix_jax import io_utils
from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.text import splitting, tokenizer as tokenizer_lib
# A noncharacter the chat template puts between "<" and "|" of message content.
from mimix_jax.text.templates import ESCAPE_MARK

# Our Tokenizer's own tokenizer_config.json, kept in exports under this name (transformers owns
# tokenizer_config.json there) so that import_hf restores the tokenizer byte for byte.
MIMIX_TOKENIZER_CONFIG = "mimix_tokenizer_config.json"


def hf_tokenizer_json(sp_model: bytes, bos_token: str) -> dict[str, Any]:
  """A sentencepiece BPE model -> tokenizer.json that `tokenizers` encodes to the same ids as our Tokenizer.

  SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece, over the
  whole (normalized) string it is given; its ids follow the scores. So: a BPE model with merges ranked by the
  merged piece's id, byte fallback, and every user-defined piece (our specials) as a special added token.
  Control and unknown pieces (<unk>) are not added tokens: sentencepiece never matches their text.
  Our Tokenizer.encode hands sentencepiece the text in pieces (text/splitting.py): it cuts after each blank line
  followed by text and between "<" and "|"; the pre-tokenizer makes the same cuts from the same patterns. (Its third cut,
  inside paragraphs longer than CHUNK_CHARS, depends on line lengths and has no pre-tokenizer equivalent: ids
  of such paragraphs may differ around the cut.) A single sequence gets `bos_token` prepended, as our
  raw-mode prompts do.
  """
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp_model)
  _check_convertible(proto)
  vocab, merges, added = _pieces(proto)
  unk = proto.pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None
  bos_id = vocab[bos_token]
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": added,
      # sentencepiece's only normalization here: spaces are written as U+2581. First the chat template's
      # escape mark goes (see chat_template): by then the added tokens were matched, so a special-token string in
      # a message is ordinary text, cut and encoded exactly as our Tokenizer encodes it.
      "normalizer": {"type": "Sequence", "normalizers": [
          {"type": "Replace", "pattern": {"String": ESCAPE_MARK}, "content": ""},
          {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
      ]},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": cut}, "behavior": "MergedWithPrevious", "invert": False}
          for cut in (splitting.PARAGRAPH_BREAK, splitting.SPECIAL_TOKEN_START)
      ]},
      "post_processor": _post_processor(bos_token, bos_id),
      "decoder": {"type": "Sequence", "decoders": [
          {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
          {"type": "ByteFallback"},
          {"type": "Fuse"},
      ]},
      "model": {
          "type": "BPE",
          "dropout": None,
          "unk_token": unk,
          "continuing_subword_prefix": None,
          "end_of_word_suffix": None,
          "fuse_unk": True,
          "byte_fallback": bool(proto.trainer_spec.byte_fallback),
          "ignore_merges": False,
          "vocab": vocab,
          "merges": merges,
      },
  }


def _post_processor(bos_token: str, bos_id: int) -> dict[str, Any]:
  """bos before a single sequence (and before each of a pair), as our raw-mode prompts have it."""
  bos = {"SpecialToken": {"id": bos_token, "type_id": 0}}
  return {
      "type": "TemplateProcessing",
      "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": bos_token, "type_id": 1}},
               {"Sequence": {"id": "B", "type_id": 1}}],
      "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
  }


def _pieces(proto) -> tuple[dict[str, int], list[list[str]], list[dict[str, Any]]]:
  """(vocab, merges ranked by the merged piece's id, the user-defined pieces as special added tokens)."""
  from sentencepiece import sentencepiece_model_pb2

  kind = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
  pieces = [(p.piece, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
  normal = {piece for piece, t in pieces if t == kind.NORMAL}
  merges = []  # (rank of the merged piece, left id, right id, left, right)
  for piece in normal:
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        merges.append((vocab[piece], vocab[left], vocab[right], left, right))
  merges.sort()
  added = [
      {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
       "special": True}
      for i, (piece, t) in enumerate(pieces) if t == kind.USER_DEFINED
  ]
  return vocab, [[left, right] for *_, left, right in merges], added


def _check_convertible(proto) -> None:
  """Rejects sentencepiece options the tokenizer.json above does not reproduce."""
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  problems = {
      "model_type": trainer.model_type != trainer.BPE,
      "normalizer_spec.precompiled_charsmap": bool(norm.precompiled_charsmap),
      "normalizer_spec.add_dummy_prefix": norm.add_dummy_prefix,
      "normalizer_spec.remove_extra_whitespaces": norm.remove_extra_whitespaces,
      "normalizer_spec.escape_whitespaces": not norm.escape_whitespaces,
      "trainer_spec.treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
  }
  bad = [name for name, is_bad in problems.items() if is_bad]
  if bad:
    raise UnsupportedConfig(f"tokenizer.model: {bad[0]} is not supported for the Hugging Face tokenizer export "
                            "(need BPE, identity normalization, no dummy prefix, no whitespace folding)")


def chat_template(names: dict[str, str]) -> str:
  """Jinja for our dialog format (text/tokenizer.py), given role -> special-token text: bos, then per message
  <start_header>role<end_header>\\n\\n content <eot>, then the assistant header if add_generation_prompt.

  Content is stripped of surrounding whitespace (Jinja's trim is str.strip), as encode_dialog_prompt does. Every
  "<|" in content becomes "<" ESCAPE_MARK "|", so that transformers cannot match a special-token string typed by
  a user as a control token (a forged turn); the tokenizer's normalizer drops the mark again.
  """
  sh, eh, eot = names["start_header"], names["end_header"], names["eot"]
  content = f"(message['content'] | trim | replace('<|', '<{ESCAPE_MARK}|'))"
  return (
      "{{- bos_token }}"
      "{%- for message in messages %}"
      f"{{{{- '{sh}' + message['role'] + '{eh}\\n\\n' + {content} + '{eot}' }}}}"
      "{%- endfor %}"
      f"{{%- if add_generation_prompt %}}{{{{- '{sh}assistant{eh}\\n\\n' }}}}{{%- endif %}}"
  )


def write_tokenizer_dir(model_dir: Path, out_dir: Path, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """Our tokenizer directory (tokenizer.model + tokenizer_config.json) from a model directory's sentencepiece model.

  Our own exports carry the original config (MIMIX_TOKENIZER_CONFIG), copied verbatim so the tokenizer hash is
  unchanged. Otherwise it is rebuilt: special-token ids looked up by their text, the reserved slots being the
  run of <|reserved_special_token_k|> pieces.
  """
  import sentencepiece as spm

  model_path = model_dir / tokenizer_lib.MODEL_FILE
  if not model_path.is_file():
    raise UnsupportedConfig(f"{model_dir}: no sentencepiece {tokenizer_lib.MODEL_FILE} (nor a tokenizer.json)")
  sp = spm.SentencePieceProcessor(model_file=str(model_path))
  if sp.get_piece_size() != vocab_size:
    raise UnsupportedConfig(f"vocab_size={vocab_size} in config.json, but {tokenizer_lib.MODEL_FILE} has "
                            f"{sp.get_piece_size()} pieces: they must be equal")
  out_dir.mkdir(parents=True)
  shutil.copyfile(model_path, out_dir / tokenizer_lib.MODEL_FILE)
  ours = model_dir / MIMIX_TOKENIZER_CONFIG
  if ours.is_file():
    shutil.copyfile(ours, out_dir / tokenizer_lib.CONFIG_FILE)
  else:
    io_utils.write_json(out_dir / tokenizer_lib.CONFIG_FILE, _tokenizer_config(sp))
  return tokenizer_lib.Tokenizer.load(out_dir)  # checks every special id against the model


def _tokenizer_config(sp) -> dict[str, Any]:
  """tokenizer_config.json for a sentencepiece model that holds our named specials."""
  ids = {}
  for role, text in tokenizer_lib.NAMED_SPECIALS.items():
    idx = sp.piece_to_id(text)
    if sp.id_to_piece(idx) != text:
      raise UnsupportedConfig(f"{tokenizer_lib.MODEL_FILE} has no {text} piece ({role}); the chat format and "
                              "stop tokens need all of " + " ".join(tokenizer_lib.NAMED_SPECIALS.values()))
    ids[role] = idx
  first = sp.piece_to_id(tokenizer_lib.reserved_special(0))
  n_reserved = 0
  while (first + n_reserved < sp.get_piece_size()
         and sp.id_to_piece(first + n_reserved) == tokenizer_lib.reserved_special(n_reserved)):
    n_reserved += 1
  return tokenizer_lib.config_for(sp.get_piece_size(), ids, first, n_reserved)
