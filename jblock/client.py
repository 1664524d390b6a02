"""The Python gRPC client of a jblock server.

  with Client("127.0.0.1:50051") as client:
    for chunk in client.generate("llama-chat", "Hello", max_tokens=16):
      print(chunk.text, end="")

Errors arrive as grpc.RpcError: `.code()` is the status (NOT_FOUND, INVALID_ARGUMENT, ...),
`.details()` the server's message.
"""

import collections
import dataclasses
import json
from typing import Iterator, Sequence

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
                       request_id=response.request_id)


class GenerateStream:
  """The chunks of one Generate call. cancel() (or leaving a `with` block) stops the
  request on the server, which frees its KV slots."""

  def __init__(self, call):
    self._call = call

  def __iter__(self) -> Iterator[GenerateChunk]:
    return self

  def __next__(self) -> GenerateChunk:
    return _chunk(next(self._call))

  def cancel(self) -> None:
    self._call.cancel()

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
               options: Sequence[tuple[str, object]] = ()):
    """`api_key`: the tenant's (or admin) key, sent as 'authorization: Bearer KEY'."""
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
               timeout: float | None = None) -> GenerateStream:
    """Streams a generation. Give `prompt` (text), `prompt_tokens` or chat `messages`
    ([{"role", "content"}]); unset sampling arguments take the server's defaults (32 tokens,
    greedy). `stop`: stop strings (the text ends before the first one)."""
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
    return GenerateStream(self._inference.Generate(request, timeout=timeout))

  def generate_text(self, model: str, prompt: str | None = None, **kwargs) -> str:
    """The whole generated text (empty for a model without a tokenizer)."""
    return "".join(chunk.text for chunk in self.generate(model, prompt, **kwargs))

  def generate_tokens(self, model: str, prompt: str | None = None, **kwargs) -> list[int]:
    """The whole list of generated token ids."""
    return [t for chunk in self.generate(model, prompt, **kwargs) for t in chunk.token_ids]

  def list_models(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> list[RemoteModel]:
    response = self._inference.ListModels(pb.ListModelsRequest(), timeout=timeout)
    return [_remote_model(info) for info in response.models]

  def health(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> str:
    """The server's status: "SERVING", or "DRAINING" while it finishes in-flight requests."""
    response = self._inference.Health(pb.HealthRequest(), timeout=timeout)
    return pb.ServingStatus.Name(response.status)

  def stats(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> dict:
    """The engine's stats dict: blocks (occupancy, KV slots, bytes, placement), queue depth,
    request counters."""
    return json.loads(self.stats_proto(timeout).json)

  def stats_proto(self, timeout: float | None = _QUICK_CALL_TIMEOUT_S) -> pb.StatsResponse:
    return self._admin.Stats(pb.StatsRequest(), timeout=timeout)

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
