"""The Python gRPC client of a jblock server.

  with Client("127.0.0.1:50051") as client:
    for chunk in client.generate("llama-chat", "Hello", max_tokens=16):
      print(chunk.text, end="")

Errors arrive as grpc.RpcError: `.code()` is the status (NOT_FOUND, INVALID_ARGUMENT, ...),
`.details()` the server's message.

A server that cannot be reached (restarting, or killed mid-request) is retried for up to
`retry_s`: the catalog and status calls, and a Generate that had streamed nothing yet (so the
retry cannot repeat output). A live server's refusal (draining, engine closed) is final.
"""

import collections
import dataclasses
import json
import time
from typing import Callable, Iterator, Sequence

import grpc

from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}
# Catalog and status calls are quick; never let them hang on a stuck server.
_QUICK_CALL_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Usage:
  prompt_tokens: int
  completion_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerateChunk:
  token_ids: tuple[int, ...]
  text: str
  finish_reason: str | None = None  # "stop" | "length" | "cancelled", on the last chunk
  usage: Usage | None = None  # on the last chunk
  request_id: str = ""
  # With logprobs asked: per token, (token, logprob, ((top token, logprob), ...)); the prompt's
  # on the first chunk (None for its first token).
  logprobs: tuple = ()
  prompt_logprobs: tuple = ()


@dataclasses.dataclass(frozen=True)
class RemoteModel:
  name: str
  family: str
  vocab_size: int
  max_seq_len: int
  chain: tuple[str, ...]
  has_tokenizer: bool
  eos_token_ids: tuple[int, ...]
  base_model: str = ""  # a LoRA adapter's base model; "" for other models


def _remote_model(info: pb.ModelInfo) -> RemoteModel:
  return RemoteModel(name=info.name, family=info.family, vocab_size=info.vocab_size,
                     max_seq_len=info.max_seq_len, chain=tuple(info.chain),
                     has_tokenizer=info.has_tokenizer, eos_token_ids=tuple(info.eos_token_ids),
                     base_model=info.base_model)


def _chunk(response: pb.GenerateResponse) -> GenerateChunk:
  usage = None
  if response.HasField("usage"):
    usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens)
  return GenerateChunk(token_ids=tuple(response.token_ids), text=response.text,
                       finish_reason=_FINISH_REASONS.get(response.finish_reason), usage=usage,
                       request_id=response.request_id,
                       logprobs=tuple(_logprob(e) for e in response.logprobs),
                       prompt_logprobs=tuple(None if i == 0 else _logprob(e)  # nothing predicts
                                             for i, e in enumerate(response.prompt_logprobs)))


def _logprob(entry: pb.TokenLogprob):
  return (entry.token_id, entry.logprob, tuple(zip(entry.top_token_ids, entry.top_logprobs)))


# UNAVAILABLE with these words comes from a live server that refuses: retrying will not help.
_FINAL_UNAVAILABLE = ("draining", "engine closed")
DEFAULT_RETRY_S = 30.0


class RetriesExhausted(grpc.RpcError):
  """The server stayed unreachable for the whole retry window (UNAVAILABLE, saying so)."""

  def __init__(self, first: grpc.RpcError, waited_s: float):
    self._details = f"{first.details()} (the server stayed unreachable; retried for {waited_s:.1f}s)"

  def code(self):
    return grpc.StatusCode.UNAVAILABLE

  def details(self):
    return self._details

  def __str__(self):
    return f"UNAVAILABLE: {self._details}"


def _retryable(error: grpc.RpcError) -> bool:
  return (error.code() == grpc.StatusCode.UNAVAILABLE
          and not any(word in (error.details() or "") for word in _FINAL_UNAVAILABLE))


class _Retry:
  """The retry window of one call: until `retry_s` after its start or its own deadline."""

  def __init__(self, retry_s: float, timeout: float | None):
    self.start = time.monotonic()
    self.end = self.start + retry_s
    if timeout is not None:
      self.end = min(self.end, self.start + timeout)
    self.first: grpc.RpcError | None = None
    self._pause = 0.1

  def left(self) -> float:
    return self.end - time.monotonic()

  def after(self, error: grpc.RpcError) -> float:
    """The deadline left for the next attempt; raises when `error` is final or time is up."""
    if self.first is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
      raise RetriesExhausted(self.first, time.monotonic() - self.start) from None
    if not _retryable(error):
      raise error
    self.first = self.first or error
    time.sleep(min(self._pause, max(self.left(), 0.0)))
    self._pause = min(self._pause * 2, 2.0)
    if self.left() <= 0:
      raise RetriesExhausted(self.first, time.monotonic() - self.start) from None
    return self.left()


def _unary(call: Callable, request, timeout: float | None, retry_s: float):
  """`call(request)`, retried while the server is unreachable."""
  retry = _Retry(retry_s, timeout)
  attempt_timeout, wait = timeout, False
  while True:
    try:
      return call(request, timeout=attempt_timeout, wait_for_ready=wait or None)
    except grpc.RpcError as e:
      if retry_s <= 0:
        raise
      attempt_timeout, wait = retry.after(e), True


class GenerateStream:
  """The chunks of one Generate call. cancel() (or leaving a `with` block) stops the
  request on the server, which frees its KV slots."""

  def __init__(self, start: Callable[[float | None, bool], object], timeout: float | None,
               retry_s: float):
    """`start(timeout, wait_for_ready)`: a new Generate call."""
    self._start, self._retry_s = start, retry_s
    self._retry = _Retry(retry_s, timeout)
    self._call = start(timeout, False)
    self._received = False

  def __iter__(self) -> Iterator[GenerateChunk]:
    return self

  def __next__(self) -> GenerateChunk:
    while True:
      try:
        chunk = self._named(_chunk(next(self._call)))
        self._received = True
        return chunk
      except grpc.RpcError as e:
        if self._received or self._retry_s <= 0:
          raise
        self._call = self._start(self._retry.after(e), True)

  def cancel(self) -> None:
    self._call.cancel()

  request_id = ""  # the request's id, from the stream's first message

  def _named(self, chunk: GenerateChunk) -> GenerateChunk:
    """The chunk with the request id: the server sends it on the first and the last
    messages only (a long id is not repeated per token); every chunk carries it here."""
    if chunk.request_id:
      self.request_id = chunk.request_id
      return chunk
    return dataclasses.replace(chunk, request_id=self.request_id)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.cancel()


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
  """Adds the API key to every call's metadata."""

  def __init__(self, api_key: str):
    self._metadata = (("authorization", f"Bearer {api_key}"),)

  def _details(self, details):
    metadata = tuple(details.metadata or ()) + self._metadata
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else \
        _CallDetails(details.method, details.timeout, metadata, details.credentials,
                     getattr(details, "wait_for_ready", None),
                     getattr(details, "compression", None))

  def intercept_unary_unary(self, continuation, client_call_details, request):
    return continuation(self._details(client_call_details), request)

  def intercept_unary_stream(self, continuation, client_call_details, request):
    return continuation(self._details(client_call_details), request)


class _CallDetails(collections.namedtuple(
    "_CallDetails", ["method", "timeout", "metadata", "credentials", "wait_for_ready",
                     "compression"]), grpc.ClientCallDetails):
  pass


class Client:
  """Inference and Admin calls on one channel. Usable as a context manager."""

  def __init__(self, target: str, *, api_key: str | None = None,
               options: Sequence[tuple[str, object]] = (), retry_s: float = DEFAULT_RETRY_S):
    """`api_key`: the tenant's (or admin) key, sent as 'authorization: Bearer KEY'.
    `retry_s`: how long an unreachable server is retried (0: never)."""
    self.retry_s = retry_s
    self._channel = grpc.insecure_channel(target, options=list(options))
    if api_key:
      self._channel = grpc.intercept_channel(self._channel, _KeyInterceptor(api_key))
    self._inference = pb_grpc.InferenceStub(self._channel)
    self._admin = pb_grpc.AdminStub(self._channel)

  def generate(self, model: str, prompt: str | None = None, *,
               prompt_tokens: Sequence[int] | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None,
               stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (),
               messages: Sequence[dict] | None = None, request_id: str | None = None,
               timeout: float | None = None, **controls) -> GenerateStream:
    """Streams a generation. Give `prompt` (text), `prompt_tokens` or chat `messages`
    ([{"role", "content"}]); unset sampling arguments take the server's defaults (32 tokens,
    greedy). `stop`: stop strings (the text ends before the first one). `controls`: the
    GenerateRequest's further fields (min_p, presence_penalty, frequency_penalty,
    repetition_penalty, logit_bias {id: bias}, min_tokens, ignore_eos, logprobs,
    prompt_logprobs, response_format as a dict)."""
    if sum(x is not None for x in (prompt, prompt_tokens, messages)) > 1:
      raise ValueError("give one of prompt, prompt_tokens and messages")
    request = pb.GenerateRequest(model=model, stop_token_ids=list(stop_token_ids),
                                 stop=list(stop))
    if prompt is not None:
      request.text = prompt
    if messages is not None:
      request.chat.SetInParent()
      for m in messages:
        request.chat.messages.add(role=m["role"], content=m["content"])
    if prompt_tokens is not None:
      request.tokens.SetInParent()  # selects the oneof even for an empty list
      request.tokens.ids.extend(int(t) for t in prompt_tokens)
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature),
                         ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                         ("request_id", request_id)):
      if value is not None:
        setattr(request, field, value)
    for field, value in controls.items():
      if field == "logit_bias":
        request.logit_bias.update({int(t): float(b) for t, b in value.items()})
      elif field == "response_format":
        request.response_format = json.dumps(value)
      elif value is not None:
        setattr(request, field, value)
    return GenerateStream(
        lambda left, wait: self._inference.Generate(request, timeout=left,
                                                    wait_for_ready=wait or None),
        timeout, self.retry_s)

  def generate_text(self, model: str, prompt: str | None = None, **kwargs) -> str:
    """The whole generated text (empty for a model without a tokenizer)."""
    return "".join(chunk.text for chunk in self.generate(model, prompt, **kwargs))

  def generate_tokens(self, model: str, prompt: str | None = None, **kwargs) -> list[int]:
    """The whole list of generated token ids."""
    return [t for chunk in self.generate(model, prompt, **kwargs) for t in chunk.token_ids]

  def list_models(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> list[RemoteModel]:
    response = _unary(self._inference.ListModels, pb.ListModelsRequest(), timeout, self.retry_s)
    return [_remote_model(info) for info in response.models]

  def health(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> str:
    """The server's status: "SERVING", or "DRAINING" while it finishes in-flight requests."""
    response = _unary(self._inference.Health, pb.HealthRequest(), timeout, self.retry_s)
    return pb.ServingStatus.Name(response.status)

  def stats(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> dict:
    """The engine's stats dict: blocks (occupancy, KV slots, bytes, placement), queue depth,
    request counters."""
    return json.loads(self.stats_proto(timeout).json)

  def stats_proto(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> pb.StatsResponse:
    return _unary(self._admin.Stats, pb.StatsRequest(), timeout, self.retry_s)

  def load_model(self, name: str, timeout: float | None = None) -> RemoteModel:
    return _remote_model(self._admin.LoadModel(pb.LoadModelRequest(name=name),
                                               timeout=timeout).model)

  def unload_model(self, name: str, timeout: float | None = None) -> None:
    """Returns once the server drained the model's requests and freed its blocks."""
    self._admin.UnloadModel(pb.UnloadModelRequest(name=name), timeout=timeout)

  def close(self) -> None:
    self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
