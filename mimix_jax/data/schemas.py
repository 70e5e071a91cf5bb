"""Normalising raw records of every supported schema into text, conversations and preference pairs.

Conversations are lists of `{"role": "system"|"user"|"assistant", "content": str}`. Accepted inputs (the
reference's merge step): `conversation` / `conversations` / `messages` lists of `{role, content}` or
`{from, value}` with roles human/gpt/user/assistant/system, and `system_prompt` + `question` + `response`
records. Every problem raises `RecordError` with a reason key that preprocessing counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from mimix_jax.data import readers
from mimix_jax.data.readers import EMPTY_TEXT, MISSING_FIELD, WRONG_TYPE, RecordError

BAD_ROLE = "bad_role"
NO_ASSISTANT = "no_assistant_turn"

TEXT_FIELDS = ("text",)
CONVERSATION_FIELDS = ("conversations", "conversation", "messages")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

Message = dict[str, str]


def text_of(record: Any, fields: Sequence[str] = TEXT_FIELDS) -> str:
  """The present `fields` joined with a newline (as the reference joins --text_fields)."""
  if not isinstance(record, dict):
    raise RecordError(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}")
  parts = []
  for field in fields:
    value = record.get(field)
    if value is None:
      continue
    if not isinstance(value, str):
      raise RecordError(WRONG_TYPE, f"field {field!r} is {type(value).__name__}, not a string")
    parts.append(value)
  if not parts:
    raise RecordError(MISSING_FIELD, f"none of the text fields {list(fields)} is present")
  text = "\n".join(parts)
  if not text.strip():
    raise RecordError(EMPTY_TEXT, f"text field {fields[0]!r} is empty" if len(fields) == 1 else "text is empty")
  return text


Problem = tuple[str, str, str]  # (loc, reason, detail) of a skipped record or line


def item_text(item: readers.Item, fields: Sequence[str] = TEXT_FIELDS, messages: bool = False
              ) -> tuple[str | None, list[Problem]]:
  """The text of one raw item (None if it has none) and the problems found on the way.

  .txt parts are taken as they are, minus lines that are not valid UTF-8 (each one a problem; a wholly empty
  document is one too); records give their `fields` joined with a newline, or with `messages`, the contents of
  a message-list field (for tokenizer training).
  """
  problems: list[Problem] = []
  try:
    if item.kind == "error":
      raise RecordError(*item.payload)
    if item.kind == "text":
      text, problems = readers.decode_text(item)
      if item.first and item.last and not text.strip():
        raise RecordError(EMPTY_TEXT, "the document is empty")
      return text, problems
    record = readers.parse(item)
    if messages and isinstance(record, dict):
      lists = [(f, record[f]) for f in fields if isinstance(record.get(f), list)]
      if lists:
        return "\n".join(m["content"] for f, value in lists for m in messages_of(value, f)), problems
    return text_of(record, fields), problems
  except RecordError as e:
    return None, [*problems, (item.loc, e.reason, e.detail)]


def iter_texts(paths: Sequence[Path], fields: Sequence[str], stats: dict, messages: bool = False) -> Iterator[str]:
  """The texts of every item in `paths` (item_text); records, skip reasons and the first examples go to `stats`."""
  skipped = stats.setdefault("skipped", {})
  examples = stats.setdefault("skipped_examples", [])
  for path in paths:
    for item in readers.iter_items(path, columns=fields):
      stats["records"] = stats.get("records", 0) + item.first  # later parts of a .txt document are not new records
      text, problems = item_text(item, fields, messages)
      for loc, reason, detail in problems:
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(examples) < 5:
          examples.append(f"{loc}: {reason}: {detail}")
      if text is not None:
        yield text


def messages_of(value: Any, field: str) -> list[Message]:
  """A list of {role, content} / {from, value} dicts, normalised to {role, content} with canonical roles."""
  if not isinstance(value, list):
    raise RecordError(WRONG_TYPE, f"field {field!r} is {type(value).__name__}, not a list of messages")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise RecordError(WRONG_TYPE, f"{field}[{i}] is {type(m).__name__}, not an object")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if role is None or content is None:
      raise RecordError(MISSING_FIELD, f"{field}[{i}] needs role/content (or from/value)")
    if not isinstance(role, str) or not isinstance(content, str):
      raise RecordError(WRONG_TYPE, f"{field}[{i}] role and content must be strings")
    if role.lower() not in ROLES:
      raise RecordError(BAD_ROLE, f"{field}[{i}] has role {role!r}; expected one of {sorted(ROLES)}")
    out.append({"role": ROLES[role.lower()], "content": content})
  return out


def conversation_of(
    record: Any, fields: Sequence[str] = CONVERSATION_FIELDS, system_message: str | None = None
) -> list[Message]:
  """The conversation in `record`: the first present field of `fields`, else system_prompt/question/response.

  system_message, if given, is prepended to conversations that have no system message of their own.
  """
  if not isinstance(record, dict):
    raise RecordError(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}")
  field = next((f for f in fields if record.get(f) is not None), None)
  if field is not None:
    messages = messages_of(record[field], field)
  elif "question" in record or "response" in record:
    messages = []
    for key, role in (("system_prompt", "system"), ("question", "user"), ("response", "assistant")):
      value = record.get(key)
      if value is None:
        if key == "system_prompt":
          continue
        raise RecordError(MISSING_FIELD, f"field {key!r} is missing")
      if not isinstance(value, str):
        raise RecordError(WRONG_TYPE, f"field {key!r} is {type(value).__name__}, not a string")
      if key != "system_prompt" or value.strip():
        messages.append({"role": role, "content": value})
  else:
    raise RecordError(MISSING_FIELD, f"none of {list(fields)} (or question/response) is present")
  if not messages:
    raise RecordError(EMPTY_TEXT, "the conversation is empty")
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError(NO_ASSISTANT, "the conversation has no assistant message")
  if system_message and messages[0]["role"] != "system":
    messages = [{"role": "system", "content": system_message}, *messages]
  return messages


def preference_of(record: Any) -> tuple[list[Message], list[Message], list[Message], list[Message]]:
  """(chosen_prompt, chosen_completion, rejected_prompt, rejected_completion) from a DPO record.

  Layouts: `prompt` (string or messages) + `chosen` + `rejected` (or `reject`) as strings or assistant
  message lists; or UltraFeedback, where `chosen`/`rejected` are whole conversations that include the prompt.
  A whole conversation splits after its last non-assistant message; the rest is the completion.
  """
  if not isinstance(record, dict):
    raise RecordError(WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}")
  rejected_key = "rejected" if record.get("rejected") is not None else "reject"
  prompt = None
  if record.get("prompt") is not None:
    value = record["prompt"]
    if isinstance(value, str):
      prompt = [{"role": "user", "content": value}]
    else:
      prompt = messages_of(value, "prompt")
  out = []
  for key in ("chosen", rejected_key):
    value = record.get(key)
    if value is None:
      raise RecordError(MISSING_FIELD, f"field {'rejected' if key == 'reject' else key!r} is missing")
    if isinstance(value, str):
      messages = [{"role": "assistant", "content": value}]
    else:
      messages = messages_of(value, key)
    last_other = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    if last_other >= 0:  # a whole conversation (UltraFeedback)
      own_prompt, completion = messages[: last_other + 1], messages[last_other + 1 :]
    else:
      if prompt is None:
        raise RecordError(MISSING_FIELD, f"field 'prompt' is missing and {key!r} holds only assistant messages")
      own_prompt, completion = prompt, messages
    if not completion:
      raise RecordError(NO_ASSISTANT, f"{key!r} has no assistant completion")
    out += [own_prompt, completion]
  return out[0], out[1], out[2], out[3]
