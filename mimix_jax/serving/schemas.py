"""The request bodies the API accepts (the OpenAI fields we honour; others are ignored) and its error type.

Validation is pydantic's: a field of the wrong type or out of range is an `invalid_request_error` naming the
field (app.py turns every validation failure, malformed JSON included, into a 400).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
  """An OpenAI-style error: HTTP status, message, type, the offending parameter and a code."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
  include_usage: bool = False


class GenerationFields(BaseModel):
  """Fields both endpoints share. Unset sampling fields take the run's defaults (model.json)."""

  model_config = ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  stop: str | list[str] | None = Field(None, max_length=4)
  seed: int | None = Field(None, ge=0)
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(1, ge=1, le=1)  # one choice per request

  def stops(self) -> list[str]:
    """The stop strings (empty ones mean nothing and are dropped)."""
    stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
    return [s for s in stops if s]


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(GenerationFields):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(GenerationFields):
  prompt: str
