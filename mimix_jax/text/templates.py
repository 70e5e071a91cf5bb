"""Chat templates as values: ours (Llama 3, built from ids) or a model's Jinja `chat_template`, rendered as
transformers renders it. Both turn dialogs into (tokens, loss_mask, ends) for training and into prompts.

tokenizer_config.json's "chat_template" names the template (TEMPLATES): "llama3", "jinja" with the source in
"jinja_chat_template", or "none". Special-token strings inside message content stay text in both: the Jinja template sees
them escaped (ESCAPE_MARK after their first character), so only the template's own specials become control
tokens, and the mark is dropped before the text is encoded.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
  from mimix_jax.text.tokenizer import Tokenizer

# A noncharacter (never in real text); the same mark our exported tokenizer.json drops (hf/tokenizer.py).
ESCAPE_MARK = "\ufdd0"
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int32 [n], loss_mask uint8 [n], ends int64 [m]


class Llama3Template:
  """Ours: [bos] + per message <|start_header_id|> role <|end_header_id|> \\n\\n content.strip() <|eot_id|>;
  the prompt ends with the assistant header. The loss is on a trained message's content and its <|eot_id|>."""

  name = "llama3"

  def __init__(self, tok: "Tokenizer", config: dict[str, Any]):
    self._tok = tok
    self._headers: dict[str, np.ndarray] = {}

  def _header(self, role: str) -> np.ndarray:
    """<|start_header_id|> role <|end_header_id|> "\\n\\n"."""
    if role not in self._headers:
      t = self._tok
      ids = [t.start_header_id, *t.encode(role), t.end_header_id, *t.encode("\n\n")]
      self._headers[role] = np.asarray(ids, np.int32)
    return self._headers[role]

  def end_of_turn(self) -> list[int]:
    return [self._tok.eot_id]

  def prompt(self, messages: Sequence[dict], bos: bool) -> list[int]:
    tokens, _, _ = self.encode_dialogs([messages], None, bos, 1)[0]
    return tokens.tolist() + self._header("assistant").tolist()

  def encode_dialogs(self, dialogs: Sequence[Sequence[dict]], loss_on: Sequence[Sequence[bool]] | None, bos: bool,
                     num_threads: int) -> list[Encoded]:
    contents = [m["content"].strip() for d in dialogs for m in d]
    ids, lengths = self._tok.encode_many(contents, num_threads=num_threads)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    eot = np.asarray([self._tok.eot_id], np.int32)
    out, k = [], 0
    for d, dialog in enumerate(dialogs):
      parts, masks = ([np.asarray([self._tok.bos_id], np.int32)], [np.zeros(1, np.uint8)]) if bos else ([], [])
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


# A first exchange to render other messages after (a chat's later turns), and a first message to render alone.
PROBE = ({"role": "user", "content": "."}, {"role": "assistant", "content": "."})


def _raise_exception(message: str):
  from jinja2.exceptions import TemplateError

  raise TemplateError(message)


class JinjaTemplate:
  """A model's chat template, rendered as transformers' apply_chat_template renders it (ImmutableSandboxedEnvironment,
  trim_blocks, lstrip_blocks, loopcontrols, raise_exception, bos_token / eos_token, add_generation_prompt) and
  tokenized as transformers tokenizes the rendered text (cut at added tokens, no extra bos).

  Assistant spans for the loss come from rendering prefixes: message j spans from the end of
  render(messages[:j], add_generation_prompt=True) to the end of render(messages[:j+1]); for each trained message
  both must render as prefixes of the whole dialog (Llama 3 and ChatML templates do). No `strftime_now` is
  given to templates (transformers gives today's date), so data does not depend on the day it was made:
  Llama 3.2's template then writes its fixed fallback date.
  """

  name = "jinja"

  def __init__(self, tok: "Tokenizer", config: dict[str, Any]):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    self._template = env.from_string(config["jinja_chat_template"])
    self._tok = tok
    names = {name: text for name, (text, _) in tok.special_tokens.items()}
    self._vars = {"bos_token": names.get("bos", ""), "eos_token": names.get("eos", "")}
    texts = sorted(tok.added_texts(), key=len, reverse=True)
    self._added = re.compile("|".join(map(re.escape, texts))) if texts else None

  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    escaped = [{**m, "content": self._escape(m["content"])} for m in messages]
    return self._template.render(messages=escaped, add_generation_prompt=add_generation_prompt, **self._vars)

  def _escape(self, content: str) -> str:
    if self._added is None:
      return content
    return self._added.sub(lambda m: m.group()[0] + ESCAPE_MARK + m.group()[1:], content)

  def _encode_rendered(self, text: str) -> list[int]:
    """Added-token strings of the rendered text as their ids, the text between them as plain text."""
    out: list[int] = []
    pos = 0
    for m in self._added.finditer(text) if self._added else ():
      out += self._plain(text[pos : m.start()])
      out.append(self._tok.token_id(m.group()))
      pos = m.end()
    return out + self._plain(text[pos:])

  def _plain(self, text: str) -> list[int]:
    text = text.replace(ESCAPE_MARK, "")
    return self._tok.encode(text) if text else []

  def _drop_bos(self, ids: list[int], bos: bool) -> list[int]:
    return ids[1:] if not bos and ids[:1] == [self._tok.bos_id] else ids

  def prompt(self, messages: Sequence[dict], bos: bool) -> list[int]:
    """bos=True: a whole conversation's prompt. bos=False: a later turn of a chat, as the template renders these
    messages after an earlier exchange (no bos, no default system message again)."""
    if bos:
      return self._encode_rendered(self.render(messages, True))
    return self._encode_rendered(self._later(messages, True))

  def end_of_turn(self) -> list[int]:
    """What the template writes after an assistant message's content (ChatML: <|im_end|> and a newline)."""
    full, prompt = self.render(PROBE, False), self.render(PROBE[:1], True)
    content = PROBE[1]["content"]
    if not full.startswith(prompt + content):
      return [self._tok.eot_id]
    return self._encode_rendered(full[len(prompt) + len(content) :])

  def _later(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """What rendering `messages` after a probe exchange adds to it."""
    before = self.render(PROBE, False)
    text = self.render([*PROBE, *messages], add_generation_prompt)
    if not text.startswith(before):
      raise ValueError("the model's chat template renders earlier turns differently once a turn follows, so a chat "
                       "cannot be fed turn by turn")
    return text[len(before) :]

  def encode_dialogs(self, dialogs: Sequence[Sequence[dict]], loss_on: Sequence[Sequence[bool]] | None, bos: bool,
                     num_threads: int) -> list[Encoded]:
    return [self._encode_dialog(d, loss_on[i] if loss_on is not None else None, bos) for i, d in enumerate(dialogs)]

  def _encode_dialog(self, dialog: Sequence[dict], loss_on: Sequence[bool] | None, bos: bool) -> Encoded:
    if not dialog:  # a chat's empty start: what the template writes before a first message (bos, a default system)
      first, block = self.render(PROBE[:1], False), self._later(PROBE[:1], False)
      head = self._drop_bos(self._encode_rendered(first[: len(first) - len(block)]), bos) if first.endswith(block) else []
      return np.asarray(head, np.int32), np.zeros(len(head), np.uint8), np.zeros(0, np.int64)
    full = self.render(dialog, False)
    cuts, trained, message_ends = [0, len(full)], [], []  # character offsets into `full`
    for j, m in enumerate(dialog):
      train = loss_on[j] if loss_on is not None else m["role"] == "assistant"
      end = self._prefix_len(full, dialog[: j + 1], False)
      if train:  # its span: from the end of the prompt that precedes it to the end of the message
        start = self._prefix_len(full, dialog[:j], m["role"] == "assistant")
        if start is None or end is None:
          raise ValueError("the model's chat template renders a dialog's first messages differently from the "
                           f"whole dialog, so {m['role']} message {j} cannot be located for the loss")
        cuts.append(start)
        trained.append((start, end))
      # Other messages' ends only bound truncation: one the template rewrites later (a system block) keeps the last.
      message_ends.append(end if end is not None else (message_ends[-1] if message_ends else 0))
    cuts = sorted(set(cuts + message_ends))
    tokens, mask, at = [], [], {0: 0}
    for a, b in zip(cuts, cuts[1:]):
      ids = self._encode_rendered(full[a:b])
      if not tokens and ids:
        ids = self._drop_bos(ids, bos)
      tokens += ids
      mask += [int(any(s <= a and b <= e for s, e in trained))] * len(ids)
      at[b] = len(tokens)
    ends = [at[e] for e in message_ends]
    return np.asarray(tokens, np.int32), np.asarray(mask, np.uint8), np.asarray(ends, np.int64)

  def _prefix_len(self, full: str, messages: Sequence[dict], add_generation_prompt: bool) -> int | None:
    """len(render(messages)) if it renders as the start of `full`, else None."""
    text = self.render(messages, add_generation_prompt)
    return len(text) if full.startswith(text) else None


class NoTemplate:
  """A model without a chat template (and without our template's special tokens): raw text only."""

  name = "none"

  def __init__(self, tok: "Tokenizer", config: dict[str, Any]):
    pass

  def prompt(self, *args: Any) -> list[int]:
    raise ValueError("this tokenizer has no chat template (the model's tokenizer_config.json has none): use raw mode")

  encode_dialogs = end_of_turn = prompt


TEMPLATES = {t.name: t for t in (Llama3Template, JinjaTemplate, NoTemplate)}
