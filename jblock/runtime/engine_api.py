"""The engine interface the serving layer talks to.

The gRPC server knows engines only through `Engine` (submit, catalog, stats) and the
`RequestHandle` every submit returns, so the serving layer runs the same over the real
block engine and over `MockEngine` (tests, CPU-only demos). JetStream splits its server
the same way.

Conventions every engine follows:
- Tokens stream through the handle as they are produced; a stop token (a requested stop id
  or one of the model's EOS ids) ends the request with "stop" and is not emitted.
- `max_new_tokens` tokens, or reaching the model's maximum length, ends it with "length".
- Cancelling (client gone, deadline) ends it with "cancelled" and frees its KV slots.
- A failure inside the engine ends it with "error"; iterating the handle raises it.
"""

import dataclasses
import functools
import math
import numbers
import operator
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

from jblock.errors import InvalidRequestError

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
FINISH_REASONS = (STOP, LENGTH, CANCELLED, ERROR)

# How long an idle wait sleeps before re-checking its condition; keeps every wait bounded.
WAIT_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request samples. Ranges: validate_sampling / validate_request. Every control is
  applied per row on the device; a batch none of whose rows use one pays nothing for it."""
  max_new_tokens: int = 32
  temperature: float = 0.0  # [0, 100]; 0 = greedy
  top_k: int = 0  # [0, 2**31 - 1]; 0 = off
  top_p: float = 1.0  # (0, 1]; 1 = off (the most likely token is always kept)
  seed: int = 0  # [0, 2**64 - 1]
  stop_token_ids: tuple[int, ...] = ()
  min_p: float = 0.0  # [0, 1]: drop tokens below min_p x the top token's probability; 0 = off
  # Penalties (vLLM's and transformers' definitions): presence and frequency [-2, 2] subtract
  # from the logits of tokens already generated (once / per occurrence); repetition (0, 10]
  # divides positive and multiplies negative logits of tokens in the prompt or generated.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, [-100, 100]) added to its logit
  min_tokens: int = 0  # stop ids (EOS included) cannot end the request before this many tokens
  ignore_eos: bool = False  # the model's EOS ids do not stop it (requested stop ids still do)
  # Logprobs of the model's raw distribution (log_softmax of the logits, before temperature,
  # penalties, bias or grammar): None = off, else the chosen token's and the top `logprobs`
  # (0-20) alternatives per generated token; `prompt_logprobs` the same for every prompt token
  # after the first (computed in prefill).
  logprobs: int | None = None
  prompt_logprobs: int | None = None

  @property
  def uses_penalties(self) -> bool:
    return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

  @functools.cached_property
  def uses_head_inputs(self) -> bool:
    """Whether the head needs more than the packed sampling fields for this request
    (jblock.runtime.head_rows); once per request, not per step."""
    return (self.uses_penalties or bool(self.logit_bias) or self.min_tokens > 0
            or self.min_p > 0 or self.logprobs is not None or self.prompt_logprobs is not None)


def sampling_params(**fields) -> SamplingParams:
  """SamplingParams from Engine.submit's keywords: sequences become tuples, a logit_bias
  mapping (as OpenAI sends it) becomes (token, bias) pairs. Unknown names raise TypeError."""
  if "stop_token_ids" in fields:
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
  bias = fields.get("logit_bias")
  if bias is not None:
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
      fields["logit_bias"] = tuple((operator.index(int(t) if isinstance(t, str) else t), b)
                                   for t, b in pairs)
    except (TypeError, ValueError):
      raise InvalidRequestError("logit_bias", "must map token ids to numbers") from None
  return SamplingParams(**fields)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
  """One position's logprobs: the token's own, and the most likely tokens (best first)."""
  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()


@runtime_checkable
class TokenConstraint(Protocol):
  """Which tokens a request may generate next (a grammar: jblock.serving.grammar). The engine
  applies `mask()` on the device before sampling and reports each sampled token to `accept`."""
  width: int  # int32 words of the mask: ceil(vocab_size / 32)

  def mask(self) -> Any:
    """int32 [width] bitmask of the allowed next tokens (bit t % 32 of word t // 32)."""
    ...

  def accept(self, token: int) -> bool:
    """Advances by the sampled token (False: it was not allowed); may start the next mask."""
    ...

  def finished(self) -> bool:
    """Complete: the request ends with "stop" after the token that completed it."""
    ...


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  family: str
  vocab_size: int
  max_seq_len: int
  chain: tuple[str, ...]  # block ids, embedding first
  tokenizer_dir: str | None = None  # holds tokenizer.json; None: token ids only
  eos_token_ids: tuple[int, ...] = ()
  base_model: str | None = None  # a LoRA adapter's base model (None: not an adapter)


def new_request_id() -> str:
  return uuid.uuid4().hex


# The documented ranges of a request's fields: the one place both protocols are checked
# against (HTTP and gRPC only check JSON / wire types before this).
MAX_TEMPERATURE = 100.0  # float32 on device: far below its overflow, and already ~uniform
MAX_TOP_K = 2**31 - 1  # int32 on device; 0 = off, a value above the vocabulary keeps it all
MAX_SEED = 2**64 - 1  # uint64, as the proto allows (two 32-bit words on device)
MAX_STOP_TOKEN_IDS = 1024  # the model's EOS ids included
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_PENALTY = 2.0  # presence and frequency, as OpenAI allows
MAX_REPETITION_PENALTY = 10.0
# A caller's request id is echoed back to it (gRPC) and names the request in logs.
MAX_REQUEST_ID_BYTES = 256


def _shown(value) -> str:
  """A value for an error message: a hostile huge one is cut, not echoed whole."""
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _as_int(value, field: str) -> int:
  if isinstance(value, bool):
    raise InvalidRequestError(field, f"must be an integer, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise InvalidRequestError(field, f"must be an integer, got {_shown(value)}") from None


def _as_finite(value, field: str) -> float:
  """The value as a finite float; NaN, infinities, numbers past float's range and
  non-numbers are refused."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise InvalidRequestError(field, f"must be a number, got {_shown(value)}")
  try:
    number = float(value)
  except OverflowError:  # an int past 1.8e308
    number = math.inf
  if not math.isfinite(number):
    raise InvalidRequestError(field, f"must be a finite number, got {_shown(value)}")
  return number


def _as_token_ids(values, field: str) -> list[int]:
  try:
    return [operator.index(v) for v in values]
  except TypeError:
    raise InvalidRequestError(field, "token ids must be integers") from None


def validate_request_id(request_id) -> None:
  """A caller-chosen request id: None/"" (the engine picks one) or a printable string of at
  most MAX_REQUEST_ID_BYTES bytes of UTF-8."""
  if request_id is None or request_id == "":
    return
  if not isinstance(request_id, str):
    raise InvalidRequestError("request_id", "must be a string")
  try:
    size = len(request_id.encode("utf-8"))
  except UnicodeEncodeError:
    raise InvalidRequestError("request_id", "is not valid Unicode") from None
  if size > MAX_REQUEST_ID_BYTES:
    raise InvalidRequestError("request_id", f"is {size} bytes; at most "
                              f"{MAX_REQUEST_ID_BYTES} bytes are allowed")
  if not request_id.isprintable():  # no newlines or escapes in logs
    raise InvalidRequestError("request_id", "must be printable (no control characters)")


def validate_sampling(params: SamplingParams) -> None:
  """The sampling fields' documented ranges (see the MAX_* constants); InvalidRequestError
  naming the first field out of range."""
  temperature = _as_finite(params.temperature, "temperature")
  if not 0 <= temperature <= MAX_TEMPERATURE:
    raise InvalidRequestError("temperature", f"must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                              f"got {_shown(params.temperature)}")
  top_p = _as_finite(params.top_p, "top_p")
  if not 0 < top_p <= 1:  # the sampler always keeps the most likely token, however small p is
    raise InvalidRequestError("top_p", f"must be in (0, 1], got {_shown(params.top_p)}")
  top_k = _as_int(params.top_k, "top_k")
  if not 0 <= top_k <= MAX_TOP_K:
    raise InvalidRequestError("top_k", f"must be in [0, 2**31 - 1] (0 = off), got {top_k}")
  seed = _as_int(params.seed, "seed")
  if not 0 <= seed <= MAX_SEED:
    raise InvalidRequestError("seed", f"must be an integer in [0, 2**64 - 1], got "
                              f"{_shown(params.seed)}")
  min_p = _as_finite(params.min_p, "min_p")
  if not 0 <= min_p <= 1:
    raise InvalidRequestError("min_p", f"must be in [0, 1] (0 = off), got {_shown(params.min_p)}")
  for field in ("presence_penalty", "frequency_penalty"):
    value = _as_finite(getattr(params, field), field)
    if not -MAX_PENALTY <= value <= MAX_PENALTY:
      raise InvalidRequestError(field, f"must be in [-2, 2], got {_shown(value)}")
  repetition = _as_finite(params.repetition_penalty, "repetition_penalty")
  if not 0 < repetition <= MAX_REPETITION_PENALTY:
    raise InvalidRequestError("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] "
                              f"(1 = off), got {_shown(repetition)}")
  for field in ("logprobs", "prompt_logprobs"):
    value = getattr(params, field)
    if value is not None and not 0 <= _as_int(value, field) <= MAX_LOGPROBS:
      raise InvalidRequestError(field, f"must be in [0, {MAX_LOGPROBS}], got {_shown(value)}")
  if len(params.logit_bias) > MAX_LOGIT_BIAS:
    raise InvalidRequestError("logit_bias", f"{len(params.logit_bias)} entries; at most "
                              f"{MAX_LOGIT_BIAS}")
  for token, bias in params.logit_bias:
    _as_int(token, "logit_bias")
    if not -100 <= _as_finite(bias, "logit_bias") <= 100:
      raise InvalidRequestError("logit_bias", f"token {token}: bias must be in [-100, 100], got "
                                f"{_shown(bias)}")
  if _as_int(params.min_tokens, "min_tokens") < 0:
    raise InvalidRequestError("min_tokens", f"must be >= 0, got {params.min_tokens}")


def validate_request(info: ModelInfo, prompt_tokens: Sequence[int], params: SamplingParams) -> None:
  """Raises InvalidRequestError naming the first field of the request that is out of range."""
  prompt = _as_token_ids(prompt_tokens, "prompt")
  if not prompt:
    raise InvalidRequestError("prompt", "is empty; send at least one token")
  for position, token in enumerate(prompt):
    if not 0 <= token < info.vocab_size:
      raise InvalidRequestError(
          "prompt", f"token id {_shown(token)} at position {position} is outside the "
          f"vocabulary [0, {info.vocab_size}) of model {info.name!r}")
  if len(prompt) >= info.max_seq_len:  # no room for even one new token: the prompt's fault
    raise InvalidRequestError(
        "prompt", f"{len(prompt)} tokens leave no room for a new token within the maximum "
        f"sequence length {info.max_seq_len} of model {info.name!r}")
  max_new_tokens = _as_int(params.max_new_tokens, "max_tokens")
  if max_new_tokens <= 0:
    raise InvalidRequestError("max_tokens", f"must be positive, got {max_new_tokens}")
  if len(prompt) + max_new_tokens > info.max_seq_len:
    raise InvalidRequestError(
        "max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({_shown(max_new_tokens)}) "
        f"exceeds the maximum sequence length {info.max_seq_len} of model {info.name!r}")
  validate_sampling(params)
  stop_ids = _as_token_ids(params.stop_token_ids, "stop_token_ids")
  if len(stop_ids) > MAX_STOP_TOKEN_IDS:
    raise InvalidRequestError("stop_token_ids", f"{len(stop_ids)} ids; at most "
                              f"{MAX_STOP_TOKEN_IDS}, the model's EOS ids included")
  for token in stop_ids:
    if not 0 <= token < info.vocab_size:
      raise InvalidRequestError("stop_token_ids", f"token id {_shown(token)} is outside the "
                                f"vocabulary [0, {info.vocab_size})")
  for token, _ in params.logit_bias:
    if not 0 <= token < info.vocab_size:
      raise InvalidRequestError("logit_bias", f"token id {_shown(token)} is outside the "
                                f"vocabulary [0, {info.vocab_size})")
  if params.min_tokens > max_new_tokens:
    raise InvalidRequestError("min_tokens", f"{params.min_tokens} is more than max_tokens "
                              f"({max_new_tokens})")


class RequestHandle:
  """One submitted request: a thread-safe stream of its new tokens.

  The consumer side iterates, waits for the result or cancels. The engine side calls
  `_emit` per token and `_finish` once; both are no-ops after the request finished, so an
  engine racing a cancel never needs extra locking.
  """

  def __init__(self, request_id: str, model: str, prompt_len: int,
               params: SamplingParams = SamplingParams(),
               on_cancel: Callable[["RequestHandle"], None] | None = None):
    self.request_id = request_id
    self.model = model
    self.prompt_len = prompt_len
    self.params = params
    self.finish_reason: str | None = None
    self.error: BaseException | None = None
    # time.monotonic() stamps, for TTFT / TPOT.
    self.submitted_at = time.monotonic()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self._on_cancel = on_cancel
    self._cond = threading.Condition()
    self._tokens: list[int] = []
    self._logprobs: list[TokenLogprobs | None] = []  # per token, when the request asked
    self._prompt_logprobs: list[TokenLogprobs | None] = []  # per prompt token (None: the first)
    self._cancel_requested = False

  # --- consumer side

  def iter_chunks(self) -> Iterator[list[int]]:
    """Yields lists of the tokens produced since the previous yield (never empty)."""
    sent = 0
    while True:
      with self._cond:
        while sent == len(self._tokens) and self.finish_reason is None:
          self._cond.wait(WAIT_POLL_S)
        chunk = self._tokens[sent:]
        finished = self.finish_reason is not None
      if chunk:
        sent += len(chunk)
        yield chunk
      elif finished:
        if self.error is not None:
          raise self.error
        return

  def __iter__(self) -> Iterator[int]:
    for chunk in self.iter_chunks():
      yield from chunk

  def wait(self, timeout: float | None = None) -> bool:
    """Blocks until the request finished; False if `timeout` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cond:
      while self.finish_reason is None:
        remaining = WAIT_POLL_S
        if deadline is not None:
          remaining = min(remaining, deadline - time.monotonic())
        if remaining <= 0:
          return False
        self._cond.wait(remaining)
    return True

  def result(self, timeout: float | None = None) -> list[int]:
    """All new tokens once finished; raises the engine's error, TimeoutError on timeout."""
    if not self.wait(timeout):
      raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
    if self.error is not None:
      raise self.error
    return self.tokens

  def cancel(self) -> None:
    """Stops generation; the engine frees the request's KV slots. Idempotent."""
    with self._cond:
      if self._cancel_requested:
        return
      self._cancel_requested = True
      finished = self.finish_reason is not None
    if not finished and self._on_cancel is not None:
      self._on_cancel(self)
    # An engine that only polls `cancelled` frees the slots at its next step; the consumer
    # must not wait for that.
    self._finish(CANCELLED)

  @property
  def tokens(self) -> list[int]:
    with self._cond:
      return list(self._tokens)

  def logprobs(self, start: int = 0, end: int | None = None) -> list["TokenLogprobs | None"]:
    """The logprobs of tokens [start, end) (None where the request did not ask)."""
    with self._cond:
      return self._logprobs[start:end]

  @property
  def prompt_logprobs(self) -> list["TokenLogprobs | None"]:
    """Per prompt token (the first has none: nothing precedes it), once prefill is done."""
    with self._cond:
      return list(self._prompt_logprobs)

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  @property
  def cancelled(self) -> bool:
    """True once cancel() was called; engines check it at step boundaries."""
    return self._cancel_requested

  # --- engine side

  def _emit(self, token: int, logprobs: "TokenLogprobs | None" = None) -> bool:
    """Appends a produced token; False (and dropped) if the request already finished."""
    with self._cond:
      if self.finish_reason is not None:
        return False
      if self.first_token_at is None:
        self.first_token_at = time.monotonic()
      self._logprobs.append(logprobs)
      self._tokens.append(int(token))
      self._cond.notify_all()
    return True

  def _add_prompt_logprobs(self, logprobs: Sequence["TokenLogprobs | None"]) -> None:
    with self._cond:
      self._prompt_logprobs.extend(logprobs)

  def _finish(self, reason: str, error: BaseException | None = None) -> bool:
    """Ends the request; the first call wins. False if it had already finished."""
    if reason not in FINISH_REASONS:
      raise ValueError(f"unknown finish reason {reason!r}; expected one of {FINISH_REASONS}")
    if (reason == ERROR) != (error is not None):
      raise ValueError("an error is given exactly when the finish reason is 'error'")
    with self._cond:
      if self.finish_reason is not None:
        return False
      self.finish_reason = reason
      self.error = error
      self.finished_at = time.monotonic()
      self._cond.notify_all()
    return True

  def __repr__(self):
    return (f"RequestHandle({self.request_id!r}, model={self.model!r}, "
            f"tokens={len(self._tokens)}, finish_reason={self.finish_reason!r})")


@runtime_checkable
class Engine(Protocol):
  """What the serving layer needs from an engine. Every method is thread-safe."""

  def submit(self, model: str, prompt_tokens: Sequence[int], *, request_id: str | None = None,
             tenant: str | None = None, accuracy_budget: float | None = None,
             constraint: TokenConstraint | None = None, **sampling) -> RequestHandle:
    """Admits a request; `sampling` holds SamplingParams fields (max_new_tokens, temperature,
    ...). Raises NotFoundError (unknown model), InvalidRequestError (validate_request, or a
    control this engine cannot apply), OverloadedError (the bounded queue is full),
    UnavailableError (the model is being unloaded). `tenant` names whose request it is:
    admission is fair across tenants. `accuracy_budget`: the top-1 disagreement the tenant
    accepts when its steps are rerouted onto equivalent blocks (None: the engine's default; an
    engine that never reroutes ignores it). `constraint`: the tokens it may generate (a
    grammar); the handle's tokens then follow it."""
    ...

  def list_models(self) -> list[ModelInfo]:
    """The models that admit requests now."""
    ...

  def load_model(self, name: str) -> ModelInfo:
    """Loads a model from the engine's zoo (NotFoundError if the zoo lacks it)."""
    ...

  def unload_model(self, name: str) -> None:
    """Stops admitting the model, drains its in-flight requests, then frees the blocks no
    other model uses."""
    ...

  def admission_limit(self) -> int:
    """Requests the engine holds at once: its admission queue plus those running. The servers
    size their call capacity from it, so the engine's queue, not a thread count, bounds them."""
    ...

  def stats(self) -> dict:
    """JSON-able: {"blocks": [{"block_id", "kind", "models", "resident_bytes", "batch_size",
    "batches_run", "mean_occupancy", "kv_slots_used", "kv_slots_free", "placement"}],
    "queue_depth": int, "requests": {counter name: int}}."""
    ...

  def close(self) -> None:
    """Ends every outstanding request with an error and stops the engine's threads."""
    ...
