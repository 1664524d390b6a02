"""The protocol-neutral frontend: everything between a client request and the engine.

gRPC (coordinator.py) and OpenAI-compatible HTTP (http.py) are thin adapters over this:

- who is calling (tenants.py: keys, the models a tenant may use, quotas),
- prompt -> token ids: plain text, token ids, or chat messages through the model's chat
  template (transformers' own `apply_chat_template`, so the text is exactly what it makes),
- refusing a prompt by its byte size before tokenising it (prompts.py: a bound derived from
  the model's context length), tokenising in a small bounded pool so heavy input never holds
  up others,
- EOS ids merged from the model's config and its generation_config.json, stop strings as well
  as stop ids (prompts.py),
- a request's output as a (sync or async) iterator of `Delta`s with its usage
  (generation.py: incremental detokenisation, stop strings).

Error messages name only what the caller may see: an unknown model and a model the tenant may
not use get the same NOT_FOUND.
"""

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import threading
import weakref
from typing import Sequence

from jblock.errors import InvalidRequestError, NotFoundError, OverloadedError
from jblock.errors import UnavailableError
from jblock.runtime.engine_api import Engine, ModelInfo, validate_request_id
from jblock.serving import grammar as grammar_lib
from jblock.serving import text
from jblock.serving.generation import Generation
from jblock.serving.prompts import ModelText, check_stop, utf8, validate_messages
from jblock.serving.status import error_code
from jblock.serving.tenants import OPEN, PermissionDeniedError, Principal, Tenants

# A request body / gRPC message larger than this is refused before it is parsed.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
# Model names (zoo names are at most 128 characters): a longer one is refused, not looked up.
MAX_MODEL_NAME_BYTES = 256


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
  # With max_tokens unset: run to the model's maximum length (OpenAI chat, as vLLM does)
  # instead of the engine's default of 32.
  max_tokens_to_context: bool = False
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  stop: Sequence[str] = ()
  stop_token_ids: Sequence[int] = ()
  request_id: str | None = None
  # Further SamplingParams fields as given (presence_penalty, logit_bias, min_p, min_tokens,
  # ignore_eos, logprobs, prompt_logprobs, ...): the engine checks their ranges.
  sampling: dict = dataclasses.field(default_factory=dict)
  # OpenAI's response_format ({"type": "json_object" | "json_schema" | "text", ...}): the
  # output follows it (jblock.serving.grammar).
  response_format: dict | None = None
  tools: list[dict] | None = None  # OpenAI tool dicts for the chat template (tool_calls.py)


@dataclasses.dataclass(frozen=True)
class _Prepared:
  tokens: list[int]
  grammar: "grammar_lib.CompiledGrammar | None"


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
    self._texts: dict[tuple, ModelText] = {}
    self._texts_lock = threading.Lock()
    self._grammars = weakref.WeakKeyDictionary()  # ModelText -> its GrammarCompiler
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
    if len(utf8(name, "model")) > MAX_MODEL_NAME_BYTES:
      raise InvalidRequestError("model", f"is longer than {MAX_MODEL_NAME_BYTES} bytes")
    if principal.may_use(name):
      for info in self.engine.list_models():
        if info.name == name:
          return info
    # Same answer whether the model is unknown or not this tenant's: nothing leaks.
    raise NotFoundError(f"model {name[:200]!r} not found")

  def _model_text(self, info: ModelInfo) -> ModelText:
    key = (info.name, info.tokenizer_dir, info.max_seq_len, info.eos_token_ids)
    with self._texts_lock:
      cached = self._texts.get(key)
    if cached is None:
      cached = ModelText(info, self._tokenizers.get(info), self.max_request_bytes)
      with self._texts_lock:
        self._texts[key] = cached
    return cached

  # --- generation

  def _prompt_tokens(self, request: GenerationRequest, mt: ModelText) -> list[int]:
    """Runs in the tokenizer pool."""
    if request.messages is not None:
      if mt.tokenizer is None:
        raise InvalidRequestError("messages", f"model {mt.info.name!r} has no tokenizer; "
                                  "send a prompt of token ids")
      prompt = mt.chat_text(request.messages, tools=request.tools)
      mt.check_bytes(prompt, "messages")
      # The template already holds the special tokens (apply_chat_template's tokenize=True).
      return mt.tokenizer.encode(prompt, add_special_tokens=False).ids
    if request.text is not None:
      if mt.tokenizer is None:
        raise InvalidRequestError("prompt", f"model {mt.info.name!r} has no tokenizer; send "
                                  "the prompt as token ids")
      return text.encode(mt.tokenizer, request.text)
    return list(request.token_ids)

  def _precheck(self, request: GenerationRequest, mt: ModelText) -> None:
    """Cheap checks before any tokenising: the request id, the prompt's kind and byte size.
    Sampling ranges are the engine's (engine_api.validate_request), for both protocols."""
    validate_request_id(request.request_id)
    given = [x is not None for x in (request.text, request.token_ids, request.messages)]
    if sum(given) != 1:
      raise InvalidRequestError("prompt", "give exactly one of a text prompt, token ids or "
                                "chat messages")
    if request.text is not None:
      if not isinstance(request.text, str):
        raise InvalidRequestError("prompt", "must be a string")
      mt.check_bytes(request.text, "prompt")
    if request.token_ids is not None and len(request.token_ids) > mt.info.max_seq_len:
      raise InvalidRequestError(
          "prompt", f"{len(request.token_ids)} tokens exceed the maximum sequence length "
          f"{mt.info.max_seq_len} of model {mt.info.name!r}")
    if request.messages is not None:
      request.messages = validate_messages(request.messages)
      size = sum(len(utf8(m["content"], "messages")) for m in request.messages)
      if size > mt.max_prompt_bytes:
        raise InvalidRequestError(
            "messages", f"are {size} bytes, more than model {mt.info.name!r} can take in "
            f"{mt.info.max_seq_len} tokens (at most {mt.max_prompt_bytes} bytes); refused "
            "without tokenising them")

  def _prepare(self, request: GenerationRequest, mt: ModelText) -> "_Prepared":
    """The prompt's token ids and, for a response_format, its compiled grammar (both can take
    a while: they run in the pool)."""
    grammar = None
    if request.response_format not in (None, {"type": "text"}):
      if mt.tokenizer is None:
        raise InvalidRequestError("response_format", f"model {mt.info.name!r} has no tokenizer")
      if not mt.eos_ids:  # the grammar engine ends a value with an EOS token
        raise InvalidRequestError("response_format", f"model {mt.info.name!r} has no EOS token "
                                  "id, which structured output needs")
      grammar = self._grammar_compiler(mt).compile(request.response_format)
    return _Prepared(self._prompt_tokens(request, mt), grammar)

  def _grammar_compiler(self, mt: ModelText) -> grammar_lib.GrammarCompiler:
    with self._texts_lock:  # one per ModelText: a reloaded model gets a new one
      compiler = self._grammars.get(mt)
      if compiler is None:
        compiler = grammar_lib.GrammarCompiler(mt.tokenizer, mt.info.vocab_size, mt.eos_ids)
        self._grammars[mt] = compiler
      return compiler

  def _tokenize_async(self, request: GenerationRequest, mt: ModelText, work=None
                      ) -> concurrent.futures.Future:
    """Runs `work(request, mt)` (default: the prompt's token ids) in the bounded pool."""
    if not self._pool_slots.acquire(blocking=False):
      raise OverloadedError("too many prompts waiting to be tokenised; retry shortly")
    try:
      future = self._pool.submit(work or self._prompt_tokens, request, mt)
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
    stop = check_stop(request.stop)
    if stop and mt.tokenizer is None:
      raise InvalidRequestError("stop", f"model {mt.info.name!r} has no tokenizer; use stop "
                                "token ids")
    request.stop = stop
    return mt, self._tokenize_async(request, mt, self._prepare)

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

  def _submit(self, principal: Principal, request: GenerationRequest, mt: ModelText,
              prepared: "_Prepared", choice: int = 0) -> Generation:
    """Submits one choice of the request: choice i > 0 samples with its own seed, derived from
    the request's (choice_seed)."""
    prompt = prepared.tokens
    tenant = principal.tenant
    eos = () if request.sampling.get("ignore_eos") else mt.eos_ids
    kwargs = {**request.sampling, "stop_token_ids": tuple(request.stop_token_ids) + eos,
              "tenant": tenant.name if tenant is not None else None,  # fair scheduling
              "accuracy_budget": tenant.accuracy_budget if tenant is not None else None}
    for field, name in (("max_tokens", "max_new_tokens"), ("temperature", "temperature"),
                        ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                        ("request_id", "request_id")):
      value = getattr(request, field)
      if value is not None:
        kwargs[name] = value
    if request.max_tokens is None and request.max_tokens_to_context:
      kwargs["max_new_tokens"] = max(mt.info.max_seq_len - len(prompt), 1)
    if choice:
      kwargs["seed"] = choice_seed(request.seed or 0, choice)
      kwargs.pop("request_id", None)  # the engine names the other choices
    try:
      if prepared.grammar is not None:  # each choice follows the grammar on its own
        kwargs["constraint"] = self._grammar_compiler(mt).constraint(prepared.grammar)
      handle = self.engine.submit(mt.info.name, prompt, **kwargs)
    except NotFoundError:
      raise NotFoundError(f"model {mt.info.name!r} not found") from None
    return Generation(self, principal, mt, prompt, handle, request.stop)

  def generate(self, principal: Principal, request: GenerationRequest) -> Generation:
    """Admits, tokenises (in the pool) and submits a request; blocking. Close the returned
    Generation (or iterate it to the end) to release its quota."""
    self._enter(principal)
    try:
      mt, future = self._begin(principal, request)
      return self._submit(principal, request, mt, future.result())
    except BaseException as e:
      self._end(principal)
      self._observe(principal, e)
      raise

  async def agenerate(self, principal: Principal, request: GenerationRequest) -> Generation:
    """generate() for an event loop: tokenising never blocks the loop."""
    return (await self.agenerate_choices(principal, request, 1))[0]

  async def agenerate_choices(self, principal: Principal, request: GenerationRequest,
                              n: int) -> list[Generation]:
    """`n` generations of one prompt, tokenised once: choice i samples with choice_seed(seed,
    i). Each is admitted (quota, in-flight slot) as a request of its own; the engine's prefix
    cache lets the later choices adopt the KV of the prompt the first computes. On an error
    the choices already submitted are closed."""
    self._enter(principal)
    out: list[Generation] = []
    try:
      mt, future = self._begin(principal, request)
      prepared = await asyncio.wrap_future(future)
      out.append(self._submit(principal, request, mt, prepared))
      for i in range(1, n):
        self._enter(principal)
        try:
          out.append(self._submit(principal, request, mt, prepared, choice=i))
        except BaseException:
          self._end(principal)
          raise
      return out
    except BaseException as e:
      if not out:
        self._end(principal)
      for generation in out:
        generation.close("CANCELLED")
      self._observe(principal, e)
      raise

  # --- text only (HTTP /tokenize and /detokenize): no quota, no engine

  async def atokenize(self, principal: Principal, model: str, *, text: str | None = None,
                      messages: list | None = None) -> tuple[list[int], ModelInfo]:
    """The token ids a generation of `model` would start from (text, or chat messages through
    the chat template), tokenised in the pool, as a generation's prompt is."""
    info = self.model(principal, model)
    mt = self._model_text(info)
    request = GenerationRequest(model=model, text=text, messages=messages)
    self._precheck(request, mt)
    return await asyncio.wrap_future(self._tokenize_async(request, mt)), info

  def detokenize(self, principal: Principal, model: str, token_ids) -> str:
    """The text of `token_ids` (special tokens skipped), as a finished generation shows it."""
    info = self.model(principal, model)
    mt = self._model_text(info)
    if mt.tokenizer is None:
      raise InvalidRequestError("tokens", f"model {info.name!r} has no tokenizer")
    if not isinstance(token_ids, list) or len(token_ids) > info.max_seq_len:
      raise InvalidRequestError("tokens", f"must be a list of at most {info.max_seq_len} token "
                                "ids")
    for i, t in enumerate(token_ids):
      if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < info.vocab_size:
        raise InvalidRequestError("tokens", f"entry {i} is not a token id in [0, "
                                  f"{info.vocab_size}) of model {info.name!r}")
    return mt.tokenizer.decode(token_ids, skip_special_tokens=True)

  def _observe(self, principal: Principal | None, error: BaseException | None,
               generation: Generation | None = None, status: str | None = None) -> None:
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


def choice_seed(seed: int, choice: int) -> int:
  """The seed of choice `choice` of a request seeded `seed` (choice 0 keeps it): distinct per
  choice, and the same for the same request, so a seeded n > 1 request is reproducible."""
  digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def tenants_from_flag(path: str | None) -> Tenants | None:
  if not path:
    return None
  tenants = Tenants.from_file(path)
  logging.info("jblock: %d tenant(s) from %s", len(tenants.tenants), path)
  return tenants


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DrainState", "Frontend", "Generation",
           "GenerationRequest", "MAX_MODEL_NAME_BYTES", "choice_seed", "tenants_from_flag"]
