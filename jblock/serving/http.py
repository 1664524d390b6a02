"""OpenAI-compatible HTTP API (FastAPI on uvicorn): a thin adapter over the frontend.

  GET  /v1/models, /v1/models/{model}
  POST /v1/completions, /v1/chat/completions   (stream: server-sent events, data: [DONE])
  GET  /health                                 (200 serving, 503 draining; no key needed)
  GET  /metrics                                (Prometheus, as vLLM serves it on its API port;
                                                per-tenant series only with the admin key)

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
HTTP status of the error (400/401/403/404/429/503); 429 carries a Retry-After header. A
client that disconnects cancels its request, which frees its KV at once.
"""

import json
import logging
import math
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
import uvicorn

from jblock.errors import InvalidRequestError, JBlockError
from jblock.serving.frontend import Frontend, GenerationRequest
from jblock.serving.status import HTTP_STATUS, error_code

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error", 500: "server_error", 504: "server_error"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_USER_CHARS = 256


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


# Only JSON types are checked here; the ranges are the engine's (engine_api.validate_request),
# the same for gRPC.
def _int(data: dict, key: str):
  value = data.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise InvalidRequestError(key, f"must be an integer, got {type(value).__name__}")
  return value


def _number(data: dict, key: str):
  """A JSON number as parsed (NaN and Infinity too: the engine refuses them, naming `key`)."""
  value = data.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise InvalidRequestError(key, f"must be a number, got {type(value).__name__}")
  return value


def _bool(data: dict, key: str) -> bool:
  value = data.get(key, False)
  if value is None:
    return False
  if not isinstance(value, bool):
    raise InvalidRequestError(key, "must be true or false")
  return value


def _unsupported(data: dict, key: str, allowed=(False, 0)) -> None:
  """Refuses a field set to anything but its no-op values (absent, null, empty, `allowed`)."""
  value = data.get(key)
  if value is None or value in ({}, [], ""):
    return
  if isinstance(value, (bool, int, float)) and value in allowed:
    return
  raise InvalidRequestError(key, "is not supported by this server")


def _common(data: dict, *, chat: bool) -> tuple[GenerationRequest, dict]:
  """The sampling fields both endpoints share; returns (request, options)."""
  model = data.get("model")
  if not isinstance(model, str) or not model:
    raise InvalidRequestError("model", "is required (a model name from GET /v1/models)")
  n = _int(data, "n")
  if n not in (None, 1):
    raise InvalidRequestError("n", "only n=1 is supported")
  for key in ("presence_penalty", "frequency_penalty", "logit_bias", "suffix", "tools",
              "functions", "tool_choice", "response_format", "echo"):
    _unsupported(data, key)
  _unsupported(data, "best_of", allowed=(1,))
  logprobs = data.get("logprobs")
  if logprobs not in (None, False) and not (isinstance(logprobs, int) and logprobs == 0
                                            and not isinstance(logprobs, bool)):
    raise InvalidRequestError("logprobs", "are not supported by this server")
  stop = data.get("stop")
  if isinstance(stop, str):
    stop = [stop]
  elif stop is None:
    stop = []
  elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise InvalidRequestError("stop", "must be a string or a list of strings")
  user = data.get("user")  # OpenAI's end-user id: accepted, not used
  if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
    raise InvalidRequestError("user", f"must be a string of at most {MAX_USER_CHARS} characters")
  max_tokens = _int(data, "max_completion_tokens") if chat else None
  if max_tokens is None:
    max_tokens = _int(data, "max_tokens")
  request = GenerationRequest(
      model=model, max_tokens=max_tokens, temperature=_number(data, "temperature"),
      top_p=_number(data, "top_p"), top_k=_int(data, "top_k"), seed=_int(data, "seed"),
      stop=tuple(stop))
  stream = _bool(data, "stream")
  options = data.get("stream_options")
  if options is not None and not isinstance(options, dict):
    raise InvalidRequestError("stream_options", "must be an object")
  include_usage = bool(options and options.get("include_usage"))
  return request, {"stream": stream, "include_usage": include_usage}


def completion_request(data: dict) -> tuple[GenerationRequest, dict]:
  request, options = _common(data, chat=False)
  prompt = data.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str):
    request.text = prompt
  elif isinstance(prompt, list) and prompt and all(
      isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    request.token_ids = prompt
  elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    raise InvalidRequestError("prompt", "one prompt per request (n=1, no batches)")
  else:
    raise InvalidRequestError("prompt", "must be a string or a list of token ids")
  if request.max_tokens is None:
    request.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
  return request, options


def chat_request(data: dict) -> tuple[GenerationRequest, dict]:
  request, options = _common(data, chat=True)
  messages = data.get("messages")
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages", "must be a non-empty list")
  request.messages = messages
  request.max_tokens_to_context = request.max_tokens is None
  return request, options


def _finish_reason(reason: str | None) -> str:
  return "length" if reason == "length" else "stop"


def _usage(generation) -> dict:
  usage = generation.usage
  return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
          "total_tokens": usage.total_tokens}


def _sse(data: Any) -> bytes:
  return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


def build_app(frontend: Frontend, *, max_body_bytes: int | None = None) -> FastAPI:
  limit = max_body_bytes or frontend.max_request_bytes
  app = FastAPI(title="jblock", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(Exception)
  async def _any_error(request, error):  # what escaped a handler: never a crash
    return error_response(error)

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
      gen_request, options = chat_request(data) if chat else completion_request(data)
      generation = await frontend.agenerate(principal, gen_request)
    except Exception as e:
      frontend.observe_refused(e)  # no-op when the frontend counted it already
      return error_response(e)
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    head = {"id": f"{prefix}-{generation.request_id}", "created": int(time.time()),
            "model": generation.model}
    if options["stream"]:
      return StreamingResponse(_stream(generation, head, kind, chat, options["include_usage"]),
                               media_type="text/event-stream", headers=_SSE_HEADERS)
    return await _whole(request, generation, head, kind, chat)

  async def _whole(request, generation, head, kind, chat):
    parts = []
    try:
      async for delta in generation:
        parts.append(delta.text)
        if await request.is_disconnected():
          generation.close("CANCELLED")
          return JSONResponse({}, status_code=499)
    except Exception as e:
      return error_response(e)
    finally:
      generation.close()
    text = "".join(parts)
    choice = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(generation.finish_reason)}
    if chat:
      choice["message"] = {"role": "assistant", "content": text}
    else:
      choice["text"] = text
    return {**head, "object": kind, "choices": [choice], "usage": _usage(generation)}

  async def _stream(generation, head, kind, chat, include_usage):
    kind = f"{kind}.chunk" if chat else kind

    def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> dict:
      choice = {"index": 0, "logprobs": None, "finish_reason": finish}
      if chat:
        choice["delta"] = ({"role": "assistant", "content": ""} if first else
                           {} if delta_text is None else {"content": delta_text})
      else:
        choice["text"] = delta_text or ""
      out = {**head, "object": kind, "choices": [choice]}
      if include_usage:
        out["usage"] = None
      return out

    try:
      if chat:
        yield _sse(chunk(None, None, first=True))
      async for delta in generation:
        if delta.text:
          yield _sse(chunk(delta.text, None))
      yield _sse(chunk(None, _finish_reason(generation.finish_reason)))
      if include_usage:
        yield _sse({**head, "object": kind, "choices": [], "usage": _usage(generation)})
      yield b"data: [DONE]\n\n"
    except Exception as e:  # mid-stream: the status line is gone, so an error event
      response = error_response(e)
      yield b"data: " + response.body + b"\n\n"
    finally:
      # Client gone (the generator is closed or cancelled) or done: frees quota and KV.
      generation.close()

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await _generate(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await _generate(request, chat=True)

  return app


class HttpServer:
  """uvicorn serving the app on host:port (0 = a free port) from a background thread."""

  def __init__(self, frontend: Frontend, port: int = 0, host: str = "127.0.0.1", *,
               max_body_bytes: int | None = None, max_connections: int = 512,
               tls_files: tuple[str, str] | None = None):
    self.app = build_app(frontend, max_body_bytes=max_body_bytes)
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
