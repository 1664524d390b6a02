"""OpenAI-compatible HTTP API (FastAPI on uvicorn): a thin adapter over the frontend.

  GET  /v1/models, /v1/models/{model}
  POST /v1/completions, /v1/chat/completions   (stream: server-sent events, data: [DONE])
  GET  /health                                 (200 serving, 503 draining; no key needed)
  GET  /metrics                                (Prometheus, as vLLM serves it on its API port;
                                                per-tenant series only with the admin key)
  GET  /openapi.json                           (the OpenAPI document: openai_schema's bodies)

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
HTTP status of the error (400/401/403/404/429/503); 429 carries a Retry-After header. A
client that disconnects cancels its request, which frees its KV at once.

Request bodies are read by _read_json (the size limit holds before anything is parsed) and
checked by openai_requests and the engine; the typed bodies of openai_schema only describe them
in /openapi.json (each route's openapi_extra), so every rule keeps one place and one message.
"""

import json
import logging
import math
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
import uvicorn

from jblock.errors import InvalidRequestError, JBlockError
from jblock.serving import openai_choices, openai_schema
from jblock.serving.frontend import Frontend
from jblock.serving.openai_requests import chat_request, completion_request
from jblock.serving.tool_calls import DEFAULT_TOOL_CALL_PARSER
from jblock.serving.status import HTTP_STATUS, error_code

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error", 500: "server_error", 504: "server_error"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyTooLargeError(InvalidRequestError):
  pass


def error_response(error: BaseException) -> JSONResponse:
  code = error_code(error)
  status = HTTP_STATUS.get(code, 500)
  if isinstance(error, JBlockError):
    message = str(error)
  else:
    logging.error("internal error serving an HTTP request", exc_info=error)
    message = f"internal error: {type(error).__name__}"
  headers = {}
  retry = getattr(error, "retry_after_s", None)
  if retry is not None:
    headers["Retry-After"] = str(max(1, math.ceil(retry)))
  body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                    "param": getattr(error, "field", None), "code": code.lower()}}
  return JSONResponse(body, status_code=status, headers=headers)


def _api_key(request: Request) -> str | None:
  header = request.headers.get("authorization")
  if header:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
  return request.headers.get("x-api-key")


async def _read_json(request: Request, limit: int) -> dict:
  length = request.headers.get("content-length")
  if length is not None and (not length.isdigit() or int(length) > limit):
    raise BodyTooLargeError("body", f"is larger than the server's limit of {limit} bytes")
  body = bytearray()
  async for piece in request.stream():
    body += piece
    if len(body) > limit:
      raise BodyTooLargeError("body", f"is larger than the server's limit of {limit} bytes")
  try:
    data = json.loads(body)
  except ValueError as e:
    raise InvalidRequestError("body", f"is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise InvalidRequestError("body", "must be a JSON object")
  return data


def _sse(data: Any) -> bytes:
  return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


def build_app(frontend: Frontend, *, max_body_bytes: int | None = None,
              tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER) -> FastAPI:
  """`tool_call_parser`: how chat outputs are read back as tool calls (tool_calls.py)."""
  limit = max_body_bytes or frontend.max_request_bytes
  app = FastAPI(title="jblock", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

  def openapi() -> dict:  # FastAPI's document, with the bodies the routes refer to
    if app.openapi_schema is None:
      document = get_openapi(title=app.title, version=app.version, routes=app.routes)
      document.setdefault("components", {}).setdefault("schemas", {}).update(
          openai_schema.components())
      app.openapi_schema = document
    return app.openapi_schema

  app.openapi = openapi

  @app.exception_handler(Exception)
  async def _any_error(request, error):  # what escaped a handler: never a crash
    return error_response(error)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, error):  # a typed parameter (none today): 400 as OpenAI's, not 422
    first = next(iter(error.errors()), {})
    loc = tuple(first.get("loc", ()))
    where = ".".join(str(part) for part in (loc[1:] if loc[:1] == ("body",) else loc))
    return error_response(InvalidRequestError(where or "body", first.get("msg", "is invalid")))

  @app.exception_handler(404)
  async def _no_route(request, error):
    return JSONResponse({"error": {"message": f"no route {request.url.path}",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "not_found"}}, status_code=404)

  @app.exception_handler(405)
  async def _bad_method(request, error):
    return JSONResponse({"error": {"message": f"method {request.method} not allowed here",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "method_not_allowed"}}, status_code=405)

  def model_card(info) -> dict:
    return {"id": info.name, "object": "model", "created": 0, "owned_by": "jblock",
            "max_model_len": info.max_seq_len}

  @app.get("/health")
  async def health():
    if frontend.drain.draining:
      return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "serving"}

  @app.get("/metrics")
  def metrics(request: Request):  # sync: FastAPI runs it on a thread (engine.stats() blocks)
    if frontend.metrics is None:
      return JSONResponse({"error": {"message": "this server keeps no metrics",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "not_found"}}, status_code=404)
    # The metrics port's rule: tenant names only for the admin (anyone on an open server).
    admin = frontend.tenants is None or frontend.tenants.is_admin(_api_key(request))
    return Response(frontend.metrics.render(include_tenants=admin),
                    media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def list_models(request: Request):
    try:
      principal = frontend.authenticate(_api_key(request))
      return {"object": "list", "data": [model_card(i) for i in frontend.list_models(principal)]}
    except Exception as e:
      return error_response(e)

  @app.get("/v1/models/{model:path}")
  async def get_model(model: str, request: Request):
    try:
      principal = frontend.authenticate(_api_key(request))
      return model_card(frontend.model(principal, model))
    except Exception as e:
      return error_response(e)

  @app.post("/tokenize")
  async def tokenize(request: Request):
    """vLLM's shape: {"model", "prompt"} or {"model", "messages"} -> {"count", "max_model_len",
    "tokens"}."""
    try:
      principal = frontend.authenticate(_api_key(request))
      data = await _read_json(request, limit)
      if ("prompt" in data) == ("messages" in data):
        raise InvalidRequestError("prompt", "give exactly one of prompt and messages")
      tokens, info = await frontend.atokenize(principal, data.get("model"),
                                              text=data.get("prompt"),
                                              messages=data.get("messages"))
      return {"count": len(tokens), "max_model_len": info.max_seq_len, "tokens": tokens}
    except Exception as e:
      return error_response(e)

  @app.post("/detokenize")
  async def detokenize(request: Request):
    """{"model", "tokens"} -> {"prompt"}: the text, special tokens skipped."""
    try:
      principal = frontend.authenticate(_api_key(request))
      data = await _read_json(request, limit)
      return {"prompt": frontend.detokenize(principal, data.get("model"), data.get("tokens"))}
    except Exception as e:
      return error_response(e)

  async def _generate(request: Request, chat: bool):
    try:
      principal = frontend.authenticate(_api_key(request))
      data = await _read_json(request, limit)
      parsed = chat_request(data) if chat else completion_request(data)
      parsed.tool_parser = tool_call_parser
      choices = await openai_choices.start(frontend, principal, parsed)
    except Exception as e:
      frontend.observe_refused(e)  # no-op when the frontend counted it already
      return error_response(e)
    prefix = "chatcmpl" if chat else "cmpl"
    head = {"id": f"{prefix}-{choices[0].generation.request_id}", "created": int(time.time()),
            "model": choices[0].generation.model}
    if parsed.stream:
      return StreamingResponse(_stream(parsed, choices, head), media_type="text/event-stream",
                               headers=_SSE_HEADERS)
    try:
      if not await openai_choices.run_all(choices, request.is_disconnected):
        return JSONResponse({}, status_code=499)
      return openai_choices.body(parsed, choices, head)
    except Exception as e:
      return error_response(e)
    finally:
      openai_choices.close(choices)

  async def _stream(parsed, choices, head):
    try:
      async for chunk in openai_choices.chunks(parsed, choices, head):
        yield _sse(chunk)
      yield b"data: [DONE]\n\n"
    except Exception as e:  # mid-stream: the status line is gone, so an error event
      response = error_response(e)
      yield b"data: " + response.body + b"\n\n"
    finally:
      # Client gone (the generator is closed or cancelled) or done: frees quota and KV.
      openai_choices.close(choices)

  @app.post("/v1/completions", openapi_extra=openai_schema.operation(
      openai_schema.CompletionRequest, openai_schema.CompletionResponse,
      openai_schema.CompletionChunk))
  async def completions(request: Request):
    return await _generate(request, chat=False)

  @app.post("/v1/chat/completions", openapi_extra=openai_schema.operation(
      openai_schema.ChatCompletionRequest, openai_schema.ChatCompletionResponse,
      openai_schema.ChatCompletionChunk))
  async def chat_completions(request: Request):
    return await _generate(request, chat=True)

  return app


class HttpServer:
  """uvicorn serving the app on host:port (0 = a free port) from a background thread."""

  def __init__(self, frontend: Frontend, port: int = 0, host: str = "127.0.0.1", *,
               max_body_bytes: int | None = None, max_connections: int = 512,
               tls_files: tuple[str, str] | None = None,
               tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER):
    self.app = build_app(frontend, max_body_bytes=max_body_bytes,
                         tool_call_parser=tool_call_parser)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self._socket = socket.socket(family, socket.SOCK_STREAM)
    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      self._socket.bind((host, port))
    except OSError as e:
      self._socket.close()
      raise OSError(f"cannot listen on {host}:{port} for HTTP: {e}") from None
    self._socket.listen(256)
    self.port = self._socket.getsockname()[1]
    self.host = host
    config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                            limit_concurrency=max_connections, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024,
                            ssl_certfile=tls_files[0] if tls_files else None,  # (cert, key)
                            ssl_keyfile=tls_files[1] if tls_files else None)
    self._server = uvicorn.Server(config)
    self._server.install_signal_handlers = lambda: None  # the launcher owns the signals
    self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                    name="jblock-http", daemon=True)

  def start(self, timeout: float = 30.0) -> None:
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self._server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the HTTP server did not start")
      time.sleep(0.01)

  def stop(self, timeout: float = 10.0) -> None:
    self._server.should_exit = True
    if self._thread.is_alive():
      self._thread.join(timeout)
    if self._thread.is_alive():
      self._server.force_exit = True
      self._thread.join(5)
    self._socket.close()
