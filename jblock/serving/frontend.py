"""The protocol-neutral frontend: everything between a client request and the engine.

gRPC (coordinator.py) and OpenAI-compatible HTTP (http.py) are thin adapters over this:

- who is calling (tenants.py: keys, the models a tenant may use, quotas),
- prompt -> token ids: plain text, token ids, or chat messages through the model's chat
  template (transformers' own `apply_chat_template`, so the text is exactly what it makes),
- refusing a prompt by its byte size before tokenising it (a bound derived from the model's
  context length), tokenising in a small bounded pool so heavy input never holds up others,
- EOS ids merged from the model's config and its generation_config.json, stop strings as well
  as stop ids, incremental detokenisation (`tokenizers.decoders.DecodeStream`), usage,
- a request's output as a (sync or async) iterator of `Delta`s.

Error messages name only what the caller may see: an unknown model and a model the tenant may
not use get the same NOT_FOUND.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from typing import AsyncIterator, Iterator, Sequence

import tokenizers
from tokenizers import decoders

from jblock.errors import InvalidRequestError, JBlockError, NotFoundError, OverloadedError
from jblock.errors import UnavailableError
from jblock.runtime.engine_api import Engine, ModelInfo, RequestHandle
from jblock.serving import text
from jblock.serving.tenants import OPEN, PermissionDeniedError, Principal, Tenants

# A request body / gRPC message larger than this is refused before it is parsed.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
# How many bytes of text one token may stand for at most, times this slack (normalisers that
# drop characters): a prompt with more bytes than max_seq_len * that cannot fit the model.
_BYTES_SLACK = 4
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256
# Prompt tokens given to the decoder as context before the first new token (spacing).
_DECODE_CONTEXT_TOKENS = 6
# Used for chat when a model's tokenizer files bring no chat template (the demo zoo).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
_ROLES = ("system", "user", "assistant", "developer", "tool")

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}


def error_code(error: BaseException) -> str:
  """The gRPC status name of an error (INTERNAL unless it is a JBlockError naming one)."""
  return getattr(error, "grpc_code", "INTERNAL") if isinstance(error, JBlockError) else "INTERNAL"


class DrainState:
  """Counts in-flight generations (both protocols) and refuses new ones once draining."""

  def __init__(self):
    self._cond = threading.Condition()
    self._draining = False
    self._in_flight = 0
    self._listeners = []

  @property
  def draining(self) -> bool:
    return self._draining

  @property
  def in_flight(self) -> int:
    return self._in_flight

  def on_drain(self, callback) -> None:
    self._listeners.append(callback)

  def try_enter(self) -> bool:
    with self._cond:
      if self._draining:
        return False
      self._in_flight += 1
      return True

  def exit(self) -> None:
    with self._cond:
      self._in_flight -= 1
      self._cond.notify_all()

  def start_draining(self) -> None:
    with self._cond:
      self._draining = True
    for callback in self._listeners:
      callback()

  def wait_idle(self, timeout: float) -> bool:
    """True once nothing is in flight; False if `timeout` passed first."""
    with self._cond:
      return self._cond.wait_for(lambda: self._in_flight == 0, timeout)


@dataclasses.dataclass
class GenerationRequest:
  """One request, as either protocol parsed it. Exactly one of text, token_ids, messages."""
  model: str
  text: str | None = None
  token_ids: Sequence[int] | None = None
  messages: list[dict] | None = None
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  stop: Sequence[str] = ()
  stop_token_ids: Sequence[int] = ()
  request_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Delta:
  token_ids: tuple[int, ...]
  text: str


@dataclasses.dataclass(frozen=True)
class Usage:
  prompt_tokens: int
  completion_tokens: int

  @property
  def total_tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens


def _max_token_bytes(tokenizer: tokenizers.Tokenizer) -> int:
  """UTF-8 bytes of the longest vocabulary entry (byte-level BPE: >= the bytes it decodes to)."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  return max((len(token.encode("utf-8")) for token in vocab), default=1)


def _generation_config_eos(tokenizer_dir: str | None) -> tuple[int, ...]:
  if not tokenizer_dir:
    return ()
  path = os.path.join(tokenizer_dir, "generation_config.json")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f).get("eos_token_id")
  except (OSError, ValueError, AttributeError):
    return ()
  values = value if isinstance(value, list) else [value]
  return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


class _ModelText:
  """A model's tokenizer, its byte bound, EOS ids and (lazily) its chat tokenizer."""

  def __init__(self, info: ModelInfo, tokenizer: tokenizers.Tokenizer | None,
               max_request_bytes: int):
    self.info = info
    self.tokenizer = tokenizer
    extra = _generation_config_eos(info.tokenizer_dir)
    self.eos_ids = tuple(sorted({*info.eos_token_ids, *(e for e in extra
                                                         if 0 <= e < info.vocab_size)}))
    per_token = _max_token_bytes(tokenizer) if tokenizer is not None else 0
    self.max_prompt_bytes = min(max_request_bytes, info.max_seq_len * max(per_token, 4)
                                * _BYTES_SLACK)
    self._chat = None
    self._chat_lock = threading.Lock()

  def chat_text(self, messages: list[dict]) -> str:
    with self._chat_lock:
      if self._chat is None:
        from transformers import AutoTokenizer  # slow import: only once chat is used
        self._chat = AutoTokenizer.from_pretrained(self.info.tokenizer_dir)
    template = None if self._chat.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
      return self._chat.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception, or a bad message shape
      raise InvalidRequestError("messages", f"the chat template rejected them: {e}") from None


def _validate_messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages", "must be a non-empty list")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise InvalidRequestError(f"messages[{i}]", "must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
      raise InvalidRequestError(f"messages[{i}].role", f"must be one of {list(_ROLES)}")
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
      parts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or \
            not isinstance(part.get("text"), str):
          raise InvalidRequestError(f"messages[{i}].content", "only text parts are supported")
        parts.append(part["text"])
      content = "".join(parts)
    if not isinstance(content, str):
      raise InvalidRequestError(f"messages[{i}].content", "must be a string")
    out.append({"role": role, "content": content})
  return out


def _utf8(value: str, field: str) -> bytes:
  try:
    return value.encode("utf-8")
  except UnicodeEncodeError:
    raise InvalidRequestError(field, "is not valid Unicode (a lone surrogate?)") from None


def _check_stop(stop) -> tuple[str, ...]:
  stop = tuple(stop or ())
  if len(stop) > MAX_STOP_STRINGS:
    raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
  for s in stop:
    if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
      raise InvalidRequestError(
          "stop", f"each stop string must be 1-{MAX_STOP_STRING_CHARS} characters")
    _utf8(s, "stop")
  return stop


class Frontend:
  """Auth, catalog, prompt preparation and text streaming over one engine. Thread-safe."""

  def __init__(self, engine: Engine, tenants: Tenants | None = None, *,
               drain: DrainState | None = None, metrics=None, tokenize_workers: int = 2,
               tokenize_queue: int = 32, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_streams: int = 256):
    self.engine = engine
    self.tenants = tenants
    self.drain = drain or DrainState()
    self.metrics = metrics
    self.max_request_bytes = max_request_bytes
    self._tokenizers = text.TokenizerCache()
    self._texts: dict[tuple, _ModelText] = {}
    self._texts_lock = threading.Lock()
    # Tokenising runs here, never on a request's own thread or the event loop: at most
    # `tokenize_workers` prompts at once, at most `tokenize_queue` waiting (then
    # RESOURCE_EXHAUSTED), so a burst of heavy prompts cannot take every core.
    self._pool = concurrent.futures.ThreadPoolExecutor(tokenize_workers,
                                                       thread_name_prefix="jblock-tokenize")
    self._pool_slots = threading.BoundedSemaphore(tokenize_queue)
    # Async streams wait for their next tokens here (one thread per waiting stream).
    self.stream_pool = concurrent.futures.ThreadPoolExecutor(max_streams,
                                                             thread_name_prefix="jblock-stream")

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
    self.stream_pool.shutdown(wait=False, cancel_futures=True)

  # --- who is calling

  def authenticate(self, api_key: str | None) -> Principal:
    """The caller of a key; an open server (no tenants) lets everyone in as OPEN."""
    if self.tenants is None:
      return OPEN
    return self.tenants.authenticate(api_key)

  def require_admin(self, principal: Principal) -> None:
    if not principal.is_admin:
      raise PermissionDeniedError("this call needs the admin key")

  # --- catalog

  def list_models(self, principal: Principal) -> list[ModelInfo]:
    return [info for info in self.engine.list_models() if principal.may_use(info.name)]

  def model(self, principal: Principal, name) -> ModelInfo:
    if not isinstance(name, str) or not name:
      raise InvalidRequestError("model", "is required")
    if principal.may_use(name):
      for info in self.engine.list_models():
        if info.name == name:
          return info
    # Same answer whether the model is unknown or not this tenant's: nothing leaks.
    raise NotFoundError(f"model {name[:200]!r} not found")

  def _model_text(self, info: ModelInfo) -> _ModelText:
    key = (info.name, info.tokenizer_dir, info.max_seq_len, info.eos_token_ids)
    with self._texts_lock:
      cached = self._texts.get(key)
    if cached is None:
      cached = _ModelText(info, self._tokenizers.get(info), self.max_request_bytes)
      with self._texts_lock:
        self._texts[key] = cached
    return cached

  # --- generation

  def _prompt_tokens(self, request: GenerationRequest, mt: _ModelText) -> list[int]:
    """Runs in the tokenizer pool."""
    if request.messages is not None:
      if mt.tokenizer is None:
        raise InvalidRequestError("messages", f"model {mt.info.name!r} has no tokenizer; "
                                  "send a prompt of token ids")
      prompt = mt.chat_text(request.messages)
      self._check_bytes(prompt, mt, "messages")
      # The template already holds the special tokens (apply_chat_template's tokenize=True).
      return mt.tokenizer.encode(prompt, add_special_tokens=False).ids
    if request.text is not None:
      if mt.tokenizer is None:
        raise InvalidRequestError("prompt", f"model {mt.info.name!r} has no tokenizer; send "
                                  "the prompt as token ids")
      return text.encode(mt.tokenizer, request.text)
    return list(request.token_ids)

  @staticmethod
  def _check_bytes(prompt: str, mt: _ModelText, field: str) -> None:
    if len(prompt) > mt.max_prompt_bytes:  # at least one byte per character: no copy needed
      size = len(prompt)
    else:
      size = len(_utf8(prompt, field))
    if size > mt.max_prompt_bytes:
      raise InvalidRequestError(
          field, f"is {size} bytes, more than model {mt.info.name!r} can take in "
          f"{mt.info.max_seq_len} tokens (at most {mt.max_prompt_bytes} bytes); refused "
          "without tokenising it")

  def _precheck(self, request: GenerationRequest, mt: _ModelText) -> None:
    """Cheap checks before any tokenising: the prompt's kind and byte size."""
    given = [x is not None for x in (request.text, request.token_ids, request.messages)]
    if sum(given) != 1:
      raise InvalidRequestError("prompt", "give exactly one of a text prompt, token ids or "
                                "chat messages")
    if request.text is not None:
      if not isinstance(request.text, str):
        raise InvalidRequestError("prompt", "must be a string")
      self._check_bytes(request.text, mt, "prompt")
    if request.token_ids is not None and len(request.token_ids) > mt.info.max_seq_len:
      raise InvalidRequestError(
          "prompt", f"{len(request.token_ids)} tokens exceed the maximum sequence length "
          f"{mt.info.max_seq_len} of model {mt.info.name!r}")
    if request.messages is not None:
      request.messages = _validate_messages(request.messages)
      size = sum(len(_utf8(m["content"], "messages")) for m in request.messages)
      if size > mt.max_prompt_bytes:
        raise InvalidRequestError(
            "messages", f"are {size} bytes, more than model {mt.info.name!r} can take in "
            f"{mt.info.max_seq_len} tokens (at most {mt.max_prompt_bytes} bytes); refused "
            "without tokenising them")

  def _tokenize_async(self, request: GenerationRequest, mt: _ModelText
                      ) -> concurrent.futures.Future:
    if not self._pool_slots.acquire(blocking=False):
      raise OverloadedError("too many prompts waiting to be tokenised; retry shortly")
    try:
      future = self._pool.submit(self._prompt_tokens, request, mt)
    except BaseException:
      self._pool_slots.release()
      raise
    future.add_done_callback(lambda _: self._pool_slots.release())
    return future

  def _begin(self, principal: Principal, request: GenerationRequest):
    """Admission and pre-checks; returns (model text, tokenising future). The caller owns
    the quota and in-flight slots from here on (release with `_end`)."""
    info = self.model(principal, request.model)
    mt = self._model_text(info)
    self._precheck(request, mt)
    stop = _check_stop(request.stop)
    if stop and mt.tokenizer is None:
      raise InvalidRequestError("stop", f"model {mt.info.name!r} has no tokenizer; use stop "
                                "token ids")
    request.stop = stop
    return mt, self._tokenize_async(request, mt)

  def _enter(self, principal: Principal) -> None:
    if not self.drain.try_enter():
      raise UnavailableError("server is draining and accepts no new requests; retry on "
                             "another replica")
    try:
      if self.tenants is not None:
        self.tenants.acquire(principal)
    except BaseException:
      self.drain.exit()
      raise

  def _end(self, principal: Principal) -> None:
    if self.tenants is not None:
      self.tenants.release(principal)
    self.drain.exit()

  def _submit(self, principal: Principal, request: GenerationRequest, mt: _ModelText,
              prompt: list[int]) -> "Generation":
    tenant = principal.tenant
    kwargs = {"stop_token_ids": tuple(request.stop_token_ids) + mt.eos_ids,
              "tenant": tenant.name if tenant is not None else None,  # fair scheduling
              "accuracy_budget": tenant.accuracy_budget if tenant is not None else None}
    for field, name in (("max_tokens", "max_new_tokens"), ("temperature", "temperature"),
                        ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                        ("request_id", "request_id")):
      value = getattr(request, field)
      if value is not None:
        kwargs[name] = value
    try:
      handle = self.engine.submit(mt.info.name, prompt, **kwargs)
    except NotFoundError:
      raise NotFoundError(f"model {mt.info.name!r} not found") from None
    return Generation(self, principal, mt, prompt, handle, request.stop)

  def generate(self, principal: Principal, request: GenerationRequest) -> "Generation":
    """Admits, tokenises (in the pool) and submits a request; blocking. Close the returned
    Generation (or iterate it to the end) to release its quota."""
    self._enter(principal)
    try:
      mt, future = self._begin(principal, request)
      prompt = future.result()
      return self._submit(principal, request, mt, prompt)
    except BaseException as e:
      self._end(principal)
      self._observe(principal, e)
      raise

  async def agenerate(self, principal: Principal, request: GenerationRequest) -> "Generation":
    """generate() for an event loop: tokenising never blocks the loop."""
    self._enter(principal)
    try:
      mt, future = self._begin(principal, request)
      prompt = await asyncio.wrap_future(future)
      return self._submit(principal, request, mt, prompt)
    except BaseException as e:
      self._end(principal)
      self._observe(principal, e)
      raise

  def _observe(self, principal: Principal | None, error: BaseException | None,
               generation: "Generation | None" = None, status: str | None = None) -> None:
    """Counts one generation (or refused request) in the metrics, once."""
    if error is not None:
      if getattr(error, "_jblock_observed", False):
        return
      try:
        error._jblock_observed = True
      except AttributeError:
        pass
    if self.metrics is None:
      return
    if status is None:
      status = "OK" if error is None else error_code(error)
    self.metrics.observe(status, generation.handle if generation is not None else None)
    self.metrics.observe_tenant(principal.label if principal else "unauthenticated", status,
                                generation)

  def observe_refused(self, error: BaseException, principal: Principal | None = None) -> None:
    """For adapters: a request refused before `generate` (bad key, unparseable request)."""
    self._observe(principal, error)

  # --- stats (admin)

  def stats(self, principal: Principal) -> dict:
    self.require_admin(principal)
    return self.engine.stats()


class Generation:
  """One admitted request: iterate (sync or async) for its Deltas; then `finish_reason`
  ("stop" | "length" | "cancelled") and `usage`. cancel() stops it and frees its KV."""

  def __init__(self, frontend: Frontend, principal: Principal, mt: _ModelText,
               prompt: list[int], handle: RequestHandle, stop: Sequence[str]):
    self._frontend = frontend
    self.principal = principal
    self.model = mt.info.name
    self.prompt_tokens = prompt
    self.handle = handle
    self.request_id = handle.request_id
    self._tokenizer = mt.tokenizer
    self._stop = tuple(stop)
    if self._tokenizer is not None:
      self._decoder = decoders.DecodeStream(ids=list(prompt[-_DECODE_CONTEXT_TOKENS:]),
                                            skip_special_tokens=True)
    self._held = ""  # text not emitted yet: it may be the start of a stop string
    self._consumed = 0  # tokens taken from the engine and accounted for
    self._stopped_by_string = False
    self._closed = False
    self._lock = threading.Lock()
    self.finish_reason: str | None = None

  @property
  def usage(self) -> Usage:
    return Usage(len(self.prompt_tokens), self._consumed)

  def cancel(self) -> None:
    self.handle.cancel()

  def close(self, status: str | None = None) -> None:
    """Releases the quota and in-flight slot (idempotent); cancels if still running."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
    if not self.handle.done:
      self.handle.cancel()
    self._frontend._end(self.principal)
    self._frontend._observe(self.principal, None, self,
                            status or ("OK" if self.finish_reason else "CANCELLED"))

  def _hold_back(self) -> int:
    """Length of the longest suffix of the held text that may start a stop string."""
    held = self._held
    for start in range(max(0, len(held) - max(len(s) for s in self._stop) + 1), len(held)):
      suffix = held[start:]
      if any(s.startswith(suffix) for s in self._stop):
        return len(held) - start
    return 0

  def _take(self, chunk: Sequence[int]) -> Delta | None:
    """Turns engine tokens into a Delta; detects stop strings. None: nothing to send."""
    if self._stopped_by_string:
      return None
    ids = []
    for token in chunk:
      ids.append(int(token))
      self._consumed += 1
      if self._tokenizer is None:
        continue
      piece = self._decoder.step(self._tokenizer, int(token))
      if piece:
        self._held += piece
      if self._stop:
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
          self._held = self._held[:min(hits)]
          self._stopped_by_string = True
          self.handle.cancel()  # frees its KV; reported as "stop"
          break
    if self._stopped_by_string or not self._stop:
      out, self._held = self._held, ""
    else:
      keep = self._hold_back()
      cut = len(self._held) - keep
      out, self._held = self._held[:cut], self._held[cut:]
    return Delta(tuple(ids), out) if ids or out else None

  def _finish(self) -> Delta | None:
    self.finish_reason = "stop" if self._stopped_by_string else self.handle.finish_reason
    out, self._held = self._held, ""
    return Delta((), out) if out else None

  def __iter__(self) -> Iterator[Delta]:
    try:
      for chunk in self.handle.iter_chunks():
        delta = self._take(chunk)
        if delta is not None:
          yield delta
        if self._stopped_by_string:
          break
      last = self._finish()
      if last is not None:
        yield last
    except BaseException as e:
      self.close(error_code(e) if isinstance(e, Exception) else None)
      raise
    self.close()

  async def __aiter__(self) -> AsyncIterator[Delta]:
    """The same Deltas, waiting for tokens on a thread, never on the event loop."""
    loop = asyncio.get_running_loop()
    chunks = self.handle.iter_chunks()
    done = object()
    try:
      while True:
        chunk = await loop.run_in_executor(self._frontend.stream_pool, next, chunks, done)
        if chunk is done:
          break
        delta = self._take(chunk)
        if delta is not None:
          yield delta
        if self._stopped_by_string:
          break
      last = self._finish()
      if last is not None:
        yield last
    except BaseException as e:
      self.close(error_code(e) if isinstance(e, Exception) else None)
      raise
    self.close()


def tenants_from_flag(path: str | None) -> Tenants | None:
  if not path:
    return None
  tenants = Tenants.from_file(path)
  logging.info("jblock: %d tenant(s) from %s", len(tenants.tenants), path)
  return tenants


__all__ = ["DrainState", "Delta", "Frontend", "Generation", "GenerationRequest", "Usage",
           "HTTP_STATUS", "error_code", "tenants_from_flag"]
