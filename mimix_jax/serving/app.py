"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, /health, and the chat page.

Responses follow the OpenAI API: a JSON object, or with `"stream": true` server-sent events (`data: {chunk}`,
ending `data: [DONE]`). Every error is OpenAI's `{"error": {message, type, param, code}}` with a 4xx status
(malformed JSON and wrong types 400, a missing or wrong API key 401, an unknown model or path 404), and none
stops the server. With an API key, /v1/* needs `Authorization: Bearer KEY`; the page and /health are open.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mimix_jax.serving.completions import Completion, Served
from mimix_jax.serving.schemas import APIError, ChatRequest, CompletionRequest

PAGE = Path(__file__).with_name("static") / "index.html"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
  """(message, param) for the first problem pydantic found."""
  err = exc.errors()[0]
  if err["type"] == "json_invalid":
    return "the request body is not valid JSON", None
  loc = [str(p) for p in err["loc"] if p != "body"]
  param = ".".join(loc) or None
  return (f"{param}: {err['msg']}" if param else f"the request body: {err['msg']}"), param


def _install_errors(app: FastAPI) -> None:
  @app.exception_handler(APIError)
  async def api_error(_, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):
    message, param = _validation_message(exc)
    return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
  async def events():
    async for chunk in chunks:
      yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
  return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream(completion: Completion, include_usage: bool, chunk: Callable[..., dict]) -> AsyncIterator[dict]:
  """The chunks of a streamed reply: chunk(text=..., finish=...) builds one in the endpoint's shape."""
  async def chunks():
    async for delta in completion.deltas():
      yield chunk(text=delta, finish=None)
    yield chunk(text="", finish=completion.finish_reason)
    if include_usage:
      yield {**chunk(text="", finish=None), "choices": [], "usage": completion.usage()}
  return chunks()


def create_app(served: Served) -> FastAPI:
  """The app over a running batcher (`served.batcher.start()` first)."""
  app = FastAPI(title=f"mimix_jax: {served.model_id}", docs_url=None, redoc_url=None, openapi_url=None)
  _install_errors(app)

  def authorised(request: Request) -> None:
    if served.api_key and request.headers.get("authorization") != f"Bearer {served.api_key}":
      raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                     code="invalid_api_key")

  def check_model(name: str) -> None:
    if name != served.model_id:
      raise APIError(404, f"the model {name!r} does not exist; this server serves {served.model_id!r}",
                     param="model", code="model_not_found")

  @app.get("/", response_class=HTMLResponse)
  def page():
    return PAGE.read_text(encoding="utf-8")

  @app.get("/health")
  def health():
    b = served.batcher
    return {"status": "ok", "model": served.model_id, "mode": "chat" if served.chat else "raw", "slots": b.n_slots,
            "busy": b.busy, "waiting": b.waiting, "finished": dict(b.finished)}

  @app.get("/v1/models", dependencies=[Depends(authorised)])
  def models():
    return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": 0,
                                        "owned_by": "mimix_jax"}]}

  @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
  async def chat_completions(body: ChatRequest):
    check_model(body.model)
    if not served.chat:
      raise APIError(400, f"{served.model_id!r} is a raw (pretrained-only) run: it serves /v1/completions; "
                     "chat needs a run fine-tuned with SFT or DPO", param="messages", code="not_a_chat_model")
    messages = [m.model_dump() for m in body.messages]
    if served.system and messages[0]["role"] != "system":
      messages.insert(0, dict(role="system", content=served.system))
    prompt = served.tokenizer.encode_dialog_prompt(messages, bos=True)
    completion = Completion(served, prompt, body, body.max_completion_tokens or body.max_tokens)
    return await _respond(served, completion, body, chat=True)

  @app.post("/v1/completions", dependencies=[Depends(authorised)])
  async def completions(body: CompletionRequest):
    check_model(body.model)
    completion = Completion(served, served.tokenizer.encode(body.prompt, bos=True), body, body.max_tokens)
    return await _respond(served, completion, body, chat=False)

  return app


async def _respond(served: Served, completion: Completion, body, *, chat: bool):
  """The reply as one JSON object, or as server-sent events when body.stream."""
  head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
          "model": served.model_id}
  if chat:
    def chunk(text: str, finish: str | None) -> dict:
      return {**head, "object": "chat.completion.chunk",
              "choices": [{"index": 0, "delta": {"role": "assistant", "content": text} if text or not finish else {},
                           "logprobs": None, "finish_reason": finish}]}
  else:
    def chunk(text: str, finish: str | None) -> dict:
      return {**head, "object": "text_completion",
              "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
  if body.stream:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _sse(_stream(completion, include_usage, chunk))
  text = await completion.text()
  if chat:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": completion.finish_reason}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": completion.usage()}
  choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": completion.finish_reason}
  return {**head, "object": "text_completion", "choices": [choice], "usage": completion.usage()}
