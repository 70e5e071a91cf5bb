"""Byte-level BPE tokenizers in and out of a run: a Hugging Face model's tokenizer.json (and its chat template,
special tokens and stop ids) or a MimixLM folder's rank file as our tokenizer directory, and back: the model's
own tokenizer files for an HF export, the original's rank file for a MimixLM export.

The run's tokenizer directory keeps the model's files verbatim (tokenizer.json, HF_CONFIG = the model's
tokenizer_config.json, chat_template.jinja) next to our tokenizer_config.json (text/tokenizer.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mimix_jax import io_utils
from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.text import backends, templates, tokenizer as tokenizer_lib

HF_CONFIG = "hf_tokenizer_config.json"  # the model's tokenizer_config.json (ours owns that name in a run)
JINJA_FILE = "chat_template.jinja"  # transformers 5 saves the template here instead of in tokenizer_config.json
# Specials that end a chat turn, by model family (Llama 3, ChatML, Gemma): the one the chat template writes, else
# the first the vocabulary has, else the model's eos.
TURN_ENDS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
# The original's presets' regex (spec §3.2) is GPT-2's, the one a ByteLevel pre-tokenizer with use_regex applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _token_text(value: Any) -> str | None:
  """A token in tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _jinja_source(model_dir: Path, hf: dict[str, Any]) -> str | None:
  if (model_dir / JINJA_FILE).is_file():
    return (model_dir / JINJA_FILE).read_text(encoding="utf-8")
  template = hf.get("chat_template")
  if isinstance(template, list):  # named templates: transformers uses "default"
    template = {t["name"]: t["template"] for t in template}.get("default")
  return template


def _stop_ids(model_dir: Path) -> list[int]:
  path = model_dir / "generation_config.json"
  eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
  return [eos] if isinstance(eos, int) else list(eos or [])


def tokenizer_json_config(model_dir: Path, vocab_size: int) -> dict[str, Any]:
  """Our tokenizer_config.json for a model directory's tokenizer.json (+ tokenizer_config.json,
  generation_config.json): named roles by the model's bos/eos/pad tokens and the turn-end table, every other
  special added token as other_special_tokens, the model's Jinja template (ours if it has none but our specials)."""
  from tokenizers import Tokenizer as HFTokenizer

  tk = HFTokenizer.from_file(str(model_dir / backends.TOKENIZER_JSON))
  if tk.get_vocab_size(with_added_tokens=True) > vocab_size:
    raise UnsupportedConfig(f"vocab_size={vocab_size} in config.json, but tokenizer.json has "
                            f"{tk.get_vocab_size(with_added_tokens=True)} ids: the model cannot embed them all")
  hf_path = model_dir / "tokenizer_config.json"
  hf = json.loads(hf_path.read_text(encoding="utf-8")) if hf_path.is_file() else {}
  texts = {role: _token_text(hf.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
  if not texts["eos"] or tk.token_to_id(texts["eos"]) is None:
    raise UnsupportedConfig(f"{hf_path}: eos_token {texts['eos']!r} is not a token of tokenizer.json")
  source = _jinja_source(model_dir, hf)
  ends = [t for t in TURN_ENDS if tk.token_to_id(t) is not None]
  texts["eot"] = next((t for t in ends if source and t in source), ends[0] if ends else texts["eos"])
  for role in ("start_header", "end_header"):
    texts[role] = tokenizer_lib.NAMED_SPECIALS[role]
  named = {role: [t, tk.token_to_id(t)] for role, t in texts.items() if t and tk.token_to_id(t) is not None}
  named_ids = {i for _, i in named.values()}
  spec = json.loads((model_dir / backends.TOKENIZER_JSON).read_text(encoding="utf-8"))
  added = spec.get("added_tokens", [])
  others = {t["content"]: t["id"] for t in added if t.get("special") and t["id"] not in named_ids}
  llama3_ok = {"bos", "eot", "start_header", "end_header"} <= set(named)
  config = {
      "tokenizer": backends.TokenizerJsonBackend.name,
      "vocab_size": vocab_size,
      "chat_template": "jinja" if source else "llama3" if llama3_ok else "none",
      "special_tokens": named,
      "other_special_tokens": others,
      "stop_ids": list(dict.fromkeys([named["eos"][1], named["eot"][1], *_stop_ids(model_dir)])),
      # A raw prompt starts with bos only where the model's tokenizer puts one there (Llama 3: yes, SmolLM: no).
      "add_bos": "bos" in named and texts["bos"] in json.dumps(spec.get("post_processor")),
  }
  if source:
    config["jinja_chat_template"] = source
  return config


def write_tokenizer_json_dir(model_dir: Path, out_dir: Path, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """A run's tokenizer directory from an HF model directory with tokenizer.json (its files kept verbatim)."""
  config = tokenizer_json_config(model_dir, vocab_size)
  out_dir.mkdir(parents=True)
  shutil.copyfile(model_dir / backends.TOKENIZER_JSON, out_dir / backends.TOKENIZER_JSON)
  for src, dst in (("tokenizer_config.json", HF_CONFIG), (JINJA_FILE, JINJA_FILE)):
    if (model_dir / src).is_file():
      shutil.copyfile(model_dir / src, out_dir / dst)
  io_utils.write_json(out_dir / tokenizer_lib.CONFIG_FILE, config)
  return tokenizer_lib.Tokenizer.load(out_dir)


def rank_file_config(original: dict[str, Any], vocab_size: int, n_ranks: int) -> dict[str, Any]:
  """Our tokenizer_config.json for the original's tokenizer_config (tokenizer "bpe"), with its special-id layout:
  named specials at their configured ids, <|reserved_special_token_k|> filling every other id of
  [n_ranks, n_ranks + num_reserved_special_tokens), k counting up from 0 (spec §3.3)."""
  named = {role: [text, int(idx)] for role, (text, idx) in original["special_tokens"].items()}
  missing = [r for r in ("bos", "eos", "eot", "start_header", "end_header", "pad") if r not in named]
  if missing:
    raise UnsupportedConfig(f"model_config.json: tokenizer_config.special_tokens has no {missing[0]!r}")
  used = {i for _, i in named.values()}
  free = [i for i in range(n_ranks, n_ranks + original.get("num_reserved_special_tokens", 256)) if i not in used]
  return {
      "tokenizer": backends.RankFileBackend.name,
      "vocab_size": vocab_size,
      "chat_template": tokenizer_lib.CHAT_TEMPLATE,  # the original's SimpleTokenizer template is ours (spec §3.4)
      "pat_str": original["pat_str"],
      "special_tokens": named,
      "other_special_tokens": {backends.reserved_special(k): i for k, i in enumerate(free) if i < vocab_size},
      "stop_ids": [named["eos"][1], named["eot"][1]],
  }


def write_rank_file_dir(folder: Path, original: dict[str, Any], out_dir: Path, vocab_size: int
                        ) -> tokenizer_lib.Tokenizer:
  """A run's tokenizer directory from a MimixLM folder's tokenizer.model rank file."""
  rank_file = folder / backends.RANK_FILE
  if not rank_file.is_file():
    raise FileNotFoundError(f"{rank_file}: missing (a MimixLM model folder holds its BPE rank file there)")
  ranks = backends.read_rank_file(rank_file)
  out_dir.mkdir(parents=True)
  shutil.copyfile(rank_file, out_dir / backends.RANK_FILE)
  io_utils.write_json(out_dir / tokenizer_lib.CONFIG_FILE, rank_file_config(original, vocab_size, len(ranks)))
  return tokenizer_lib.Tokenizer.load(out_dir)


def write_model_tokenizer(out_dir: Path, tok: tokenizer_lib.Tokenizer) -> list[str]:
  """An HF export of a tokenizer.json run: the model's own tokenizer files, as imported."""
  written = []
  for src, dst in ((backends.TOKENIZER_JSON, "tokenizer.json"), (HF_CONFIG, "tokenizer_config.json"),
                   (JINJA_FILE, JINJA_FILE)):
    if (tok.directory / src).is_file():
      shutil.copyfile(tok.directory / src, out_dir / dst)
      written.append(dst)
  return written


def _byte_level_pattern(spec: dict[str, Any]) -> str | None:
  """The regex a byte-level tokenizer.json splits with (a Split pre-tokenizer, or ByteLevel's own GPT-2
  regex), if its pre-tokenization is exactly that regex followed by byte-level mapping; else None."""
  pre = spec.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  kinds = [s.get("type") for s in steps]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
    return GPT2_PATTERN
  if (kinds == ["Split", "ByteLevel"] and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
      and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space")):
    return steps[0]["pattern"]["Regex"]
  return None


def rank_file_of(tok: tokenizer_lib.Tokenizer) -> tuple[dict[bytes, int], str] | str:
  """(ranks, pat_str) that the original's tiktoken-style BPE encodes as `tok` does, or why there are none."""
  if tok.backend.name == backends.RankFileBackend.name:
    return backends.read_rank_file(tok.directory / backends.RANK_FILE), tok.config["pat_str"]
  if tok.backend.name != backends.TokenizerJsonBackend.name:
    return "the tokenizer is a sentencepiece BPE, which the original's tiktoken-style rank file cannot express"
  spec = json.loads((tok.directory / backends.TOKENIZER_JSON).read_text(encoding="utf-8"))
  model, pattern = spec["model"], _byte_level_pattern(spec)
  if model.get("type") != "BPE" or spec.get("normalizer") or pattern is None:
    return "its tokenizer.json is not a plain byte-level BPE (normalizer, pre-tokenizer or model differ)"
  alphabet = backends.byte_level_alphabet()
  added = {t["id"] for t in spec.get("added_tokens", [])}
  ranks = {bytes(alphabet[c] for c in piece): i for piece, i in model["vocab"].items() if i not in added}
  if sorted(ranks.values()) != list(range(len(ranks))) or any(i < len(ranks) for i in added):
    return "its BPE ids are not 0..N-1 with the special tokens above them (the original's id layout)"
  return ranks, pattern


def _original_roles(tok: tokenizer_lib.Tokenizer) -> dict[str, list]:
  """role -> [text, id] for the roles the original names, through our fallbacks (pad and eot may be eos)."""
  texts = {idx: text for text, idx in tok.special_tokens.values()}
  ids = {role: getattr(tok, f"{role}_id") for role in tokenizer_lib.NAMED_SPECIALS}
  return {role: [texts[i], i] for role, i in ids.items() if i is not None}


def original_tokenizer_config(tok: tokenizer_lib.Tokenizer, pat_str: str, n_ranks: int) -> dict[str, Any]:
  """The original's tokenizer_config (model_config.json) for a rank file of n_ranks written from `tok`: its
  reserved specials then cover every id above the ranks."""
  return {
      "tokenizer": "bpe",
      "pat_str": pat_str,
      "num_reserved_special_tokens": tok.vocab_size - n_ranks,
      "special_tokens": _original_roles(tok),
      "use_tiktoken": True,
  }


def write_checked_rank_file(path: Path, ranks: dict[bytes, int], original: dict[str, Any],
                            tok: tokenizer_lib.Tokenizer) -> None:
  """Writes the rank file, then encodes sample texts with it as the original does (tiktoken): ids equal ours."""
  from mimix_jax.hf.verify import VERIFY_TEXTS, VERIFY_DIALOG

  backends.write_rank_file(path, ranks)
  theirs = backends.RankFileBackend(path.parent, original)
  texts = [*VERIFY_TEXTS, *(m["content"] for m in VERIFY_DIALOG), "naïve café 日本語 😀👍🏽  \n\n\tend"]
  ours_ids, ours_len = tok.encode_many(texts)
  their_ids, their_len = theirs.encode_many(texts)
  if not (np.array_equal(ours_ids, their_ids) and np.array_equal(ours_len, their_len)):
    raise ValueError(f"{path}: the original's BPE (tiktoken) encodes sample texts differently from this run's "
                     "tokenizer.json, so no rank file is written; export without --format mimixlm")


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The pair each multi-byte token is merged from: its bytes BPE-merged with the lower ranks only (what
  tiktoken does before it reaches the token), as transformers converts tiktoken files."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
    if len(token) < 2:
      continue
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
      pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
      best, i = min(pairs)
      if best >= rank:
        break
      parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) == 2:
      merges.append((parts[0], parts[1]))
  return merges


def tokenizer_json_from_ranks(ranks: dict[bytes, int], pat_str: str, specials: dict[str, int],
                              bos_token: str) -> dict[str, Any]:
  """tokenizer.json for a rank file: a byte-level BPE with the same ids (whole pieces looked up first, as
  tiktoken does), split by pat_str, the specials as added tokens, bos before a single sequence. Our chat
  template's escape mark is dropped by the normalizer (hf/tokenizer.py)."""
  to_char = {b: c for c, b in backends.byte_level_alphabet().items()}
  text = lambda piece: "".join(to_char[b] for b in piece)  # noqa: E731
  bos = {"SpecialToken": {"id": bos_token, "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])],
      "normalizer": {"type": "Replace", "pattern": {"String": templates.ESCAPE_MARK}, "content": ""},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": False},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
      "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                  {"Sequence": {"id": "B", "type_id": 1}}],
                         "special_tokens": {bos_token: {"id": bos_token, "ids": [specials[bos_token]],
                                                        "tokens": [bos_token]}}},
      "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": {text(t): r for t, r in ranks.items()},
                "merges": [[text(a), text(b)] for a, b in _merges(ranks)]},
  }
