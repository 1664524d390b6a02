"""The coordinator's gRPC services (Inference, Admin) over any engine_api.Engine.

A thin adapter over the protocol-neutral frontend (frontend.py: keys, tenants, quotas,
prompts, stop strings, text), like the OpenAI-compatible HTTP API (http.py). Every failure
reaches the client as a gRPC status with a readable message (a JBlockError's `grpc_code`,
INTERNAL for bugs) and never takes the server down. A client that cancels or misses its
deadline cancels its engine request, so its KV slots are freed at once. The caller's key is
the metadata `authorization: Bearer KEY`, checked before the request body is parsed
(FrontDoor: garbage without a key is UNAUTHENTICATED, with one INVALID_ARGUMENT); Admin needs
the admin key. Errors name no filesystem path. The server also serves grpc.health.v1 and
server reflection.
"""

import contextlib
import functools
import json
import math
import os
import re
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health as health_lib
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jblock.cluster import security
from jblock.errors import InvalidRequestError, JBlockError, OverloadedError
from jblock.log_limits import limited
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.engine_api import Engine, ModelInfo
from jblock.serving import frontend as frontend_lib
from jblock.serving.frontend import DrainState  # noqa: F401  (re-exported)
from jblock.serving.metrics import ServingMetrics

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Inference"].full_name,
                 pb.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
# "" is the whole server (what grpc_health_probe asks by default).
HEALTH_SERVICES = ("", SERVICE_NAMES[0], SERVICE_NAMES[1])


def status_code(error: BaseException) -> grpc.StatusCode:
  """The gRPC status for an error: its `grpc_code` if it names one, else INTERNAL."""
  return getattr(grpc.StatusCode, getattr(error, "grpc_code", ""), grpc.StatusCode.INTERNAL)


def model_info_proto(info: ModelInfo) -> pb.ModelInfo:
  return pb.ModelInfo(name=info.name, family=info.family, vocab_size=info.vocab_size,
                      max_seq_len=info.max_seq_len, chain=list(info.chain),
                      has_tokenizer=bool(info.tokenizer_dir),
                      eos_token_ids=list(info.eos_token_ids),
                      base_model=info.base_model or "")


def stats_proto(stats: dict) -> pb.StatsResponse:
  """engine.stats() as structured messages, plus the whole dict as JSON."""
  response = pb.StatsResponse(queue_depth=int(stats.get("queue_depth", 0)),
                              json=json.dumps(stats, sort_keys=True, default=str))
  for block in stats.get("blocks", []):
    placement = block.get("placement", "")
    response.blocks.add(
        block_id=str(block.get("block_id", "")), kind=str(block.get("kind", "")),
        models=[str(m) for m in block.get("models", [])],
        resident_bytes=int(block.get("resident_bytes", 0)),
        batch_size=int(block.get("batch_size", 0)), batches_run=int(block.get("batches_run", 0)),
        mean_occupancy=float(block.get("mean_occupancy", 0.0)),
        kv_slots_used=int(block.get("kv_slots_used", 0)),
        kv_slots_free=int(block.get("kv_slots_free", 0)),
        placement=placement if isinstance(placement, str) else json.dumps(placement, default=str))
  for name, value in stats.get("requests", {}).items():
    # Counters may be grouped one level deep: {"finished": {"stop": 3}} -> "finished.stop".
    group = value if isinstance(value, dict) else {None: value}
    for key, count in group.items():
      if isinstance(count, int):
        response.requests[name if key is None else f"{name}.{key}"] = count
  return response


# An absolute path in an error message: "/" not inside a word, up to a space or punctuation.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"():;,]*")


def redact_paths(message: str) -> str:
  """`message` without absolute filesystem paths, for clients: each becomes its last part (zoo
  errors already name their files relative to the zoo, as "models/x.json")."""
  return _ABSOLUTE_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "<path>",
                            message)


def _abort_on_error(context: grpc.ServicerContext, error: Exception) -> None:
  if isinstance(error, JBlockError):
    retry = getattr(error, "retry_after_s", None)
    if retry is not None:
      # A retry hint as trailing metadata (seconds) and in the message.
      context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(retry)))),))
    context.abort(status_code(error), redact_paths(str(error)))
  # A traceback for the first of a kind per interval, not one per request.
  limited.error(f"internal: {type(error).__name__}", "jblock: internal error serving a "
                "request: %s", type(error).__name__, exc_info=error)
  context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def key_from_metadata(metadata) -> str | None:
  """The key in a call's metadata: 'authorization: Bearer KEY' (or 'x-api-key: KEY')."""
  for key, value in metadata or ():
    if key == "authorization" and isinstance(value, str):
      scheme, _, token = value.partition(" ")
      return token.strip() if scheme.lower() == "bearer" else None
    if key == "x-api-key" and isinstance(value, str):
      return value
  return None


def api_key(context: grpc.ServicerContext) -> str | None:
  return key_from_metadata(context.invocation_metadata())


def _unary_errors(method):
  """Maps exceptions of a unary handler to gRPC statuses (no filesystem paths in messages)."""

  @functools.wraps(method)
  def handler(self, request, context):
    try:
      return method(self, request, context)
    except Exception as e:  # every error becomes a status; the server keeps serving
      _abort_on_error(context, e)

  return handler


def generation_request(request: pb.GenerateRequest) -> frontend_lib.GenerationRequest:
  """The protocol-neutral request of a GenerateRequest; unset fields keep the defaults."""
  out = frontend_lib.GenerationRequest(model=request.model,
                                       stop_token_ids=tuple(request.stop_token_ids),
                                       stop=tuple(request.stop))
  which = request.WhichOneof("prompt")
  if which == "tokens":
    out.token_ids = list(request.tokens.ids)
  elif which == "text":
    out.text = request.text
  elif which == "chat":
    out.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
  else:
    raise InvalidRequestError("prompt", "is empty; set text, token ids or chat messages")
  for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
    if request.HasField(field):
      setattr(out, field, getattr(request, field))
  if request.HasField("request_id") and request.request_id:
    out.request_id = request.request_id
  for field in _SAMPLING_FIELDS:
    if request.HasField(field):
      out.sampling[field] = getattr(request, field)
  if request.logit_bias:
    out.sampling["logit_bias"] = dict(request.logit_bias)
  if request.ignore_eos:
    out.sampling["ignore_eos"] = True
  if request.response_format:
    try:
      out.response_format = json.loads(request.response_format)
    except ValueError as e:
      raise InvalidRequestError("response_format", f"is not valid JSON: {e}") from None
  return out


_SAMPLING_FIELDS = ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "min_tokens", "logprobs", "prompt_logprobs")


def token_logprobs_proto(entries) -> list:
  """engine_api.TokenLogprobs (None: no logprob, as for the first prompt token) as protos."""
  return [pb.TokenLogprob() if e is None else
          pb.TokenLogprob(token_id=e.token, logprob=e.logprob,
                          top_token_ids=[t for t, _ in e.top], top_logprobs=[v for _, v in e.top])
          for e in entries]


def _gone_status(context: grpc.ServicerContext) -> grpc.StatusCode:
  """Why an RPC ended before its last message: deadline or client cancel."""
  remaining = context.time_remaining()
  if remaining is not None and remaining <= 0:
    return grpc.StatusCode.DEADLINE_EXCEEDED
  return grpc.StatusCode.CANCELLED


class InferenceServicer(pb_grpc.InferenceServicer):
  """Generate (streaming), ListModels, Health: a thin adapter over the frontend."""

  def __init__(self, frontend: frontend_lib.Frontend):
    self._frontend = frontend

  def Generate(self, request, context):
    generation, status = None, None
    try:
      principal = self._frontend.authenticate(api_key(context))
      generation = self._frontend.generate(principal, generation_request(request))
      # Client cancel or deadline: cancel the engine request so its KV slots are freed.
      gone = lambda: generation.close(_gone_status(context).name)
      if not context.add_callback(gone):
        gone()
      # The request id rides on the first and the last message only: on every message, a
      # long id would be multiplied by the length of the stream.
      request_id = generation.request_id
      prompt_logprobs = generation.handle.params.prompt_logprobs is not None
      for delta in generation:
        message = pb.GenerateResponse(request_id=request_id, token_ids=delta.token_ids,
                                      text=delta.text,
                                      logprobs=token_logprobs_proto(delta.logprobs))
        if prompt_logprobs:  # computed before the first token: sent with it
          message.prompt_logprobs.extend(token_logprobs_proto(generation.handle.prompt_logprobs))
          prompt_logprobs = False
        yield message
        request_id = ""
      if not context.is_active():
        return  # the client is gone: nobody to send the last message to
      status = grpc.StatusCode.OK
      usage = generation.usage
      yield pb.GenerateResponse(
          request_id=generation.request_id, finish_reason=_FINISH_REASONS[generation.finish_reason],
          usage=pb.Usage(prompt_tokens=usage.prompt_tokens,
                         completion_tokens=usage.completion_tokens))
    except Exception as e:  # every error becomes a status; the server keeps serving
      status = status_code(e) if isinstance(e, JBlockError) else grpc.StatusCode.INTERNAL
      if generation is None:
        self._frontend.observe_refused(e)  # no-op when the frontend counted it already
      _abort_on_error(context, e)
    finally:
      # Also reached when gRPC drops this generator because the client went away.
      if generation is not None:
        generation.close((status or _gone_status(context)).name)

  @_unary_errors
  def ListModels(self, request, context):
    principal = self._frontend.authenticate(api_key(context))
    return pb.ListModelsResponse(
        models=[model_info_proto(info) for info in self._frontend.list_models(principal)])

  @_unary_errors
  def Health(self, request, context):
    drain = self._frontend.drain
    status = pb.DRAINING if drain.draining else pb.SERVING
    # Needs no key; counts only the models the caller may see (none without a valid key).
    try:
      visible = len(self._frontend.list_models(self._frontend.authenticate(api_key(context))))
    except JBlockError:
      visible = 0
    return pb.HealthResponse(status=status, models_loaded=visible, in_flight=drain.in_flight)


class AdminServicer(pb_grpc.AdminServicer):
  """LoadModel, UnloadModel, Stats: only with the admin key (or on an open server)."""

  def __init__(self, frontend: frontend_lib.Frontend):
    self._frontend = frontend
    self._engine = frontend.engine

  def _admin(self, context) -> None:
    self._frontend.require_admin(self._frontend.authenticate(api_key(context)))

  @_unary_errors
  def LoadModel(self, request, context):
    self._admin(context)
    if not request.name:
      raise InvalidRequestError("name", "is required")
    return pb.LoadModelResponse(model=model_info_proto(self._engine.load_model(request.name)))

  @_unary_errors
  def UnloadModel(self, request, context):
    self._admin(context)
    if not request.name:
      raise InvalidRequestError("name", "is required")
    self._engine.unload_model(request.name)
    return pb.UnloadModelResponse()

  @_unary_errors
  def Stats(self, request, context):
    self._admin(context)
    return stats_proto(self._engine.stats())


class CoordinatorServer(grpc.Server):
  """A grpc.Server serving Inference and Admin, with a graceful `drain`."""

  def __init__(self, server: grpc.Server, inference: InferenceServicer, admin: AdminServicer,
               drain_state: DrainState, frontend: frontend_lib.Frontend):
    self._server = server
    self.inference = inference
    self.admin = admin
    self.drain_state = drain_state
    self.frontend = frontend

  def drain(self, timeout: float, grace: float = 1.0) -> bool:
    """Refuses new Generate calls (UNAVAILABLE), waits up to `timeout` for the in-flight
    ones to finish, then stops the server, aborting what is left. True if none was left."""
    self.drain_state.start_draining()
    idle = self.drain_state.wait_idle(timeout)
    self._server.stop(grace).wait(grace + 5)
    return idle

  # grpc.Server, delegated.
  def add_generic_rpc_handlers(self, generic_rpc_handlers):
    self._server.add_generic_rpc_handlers(generic_rpc_handlers)

  def add_registered_method_handlers(self, service_name, method_handlers):
    self._server.add_registered_method_handlers(service_name, method_handlers)

  def add_insecure_port(self, address):
    return self._server.add_insecure_port(address)

  def add_secure_port(self, address, server_credentials):
    return self._server.add_secure_port(address, server_credentials)

  def start(self):
    self._server.start()

  def stop(self, grace):
    return self._server.stop(grace)

  def wait_for_termination(self, timeout=None):
    return self._server.wait_for_termination(timeout)


# Capacity. gRPC's sync server runs each call on a pool thread, a Generate stream for as long as
# it streams, and refuses calls past `maximum_concurrent_rpcs` with its own "Concurrent RPC limit
# exceeded!". The pool is therefore sized from the engine's admission limit (its waiting queue
# plus the requests holding KV), so the engine's queue, not a thread count, bounds the streams,
# and a stream past it gets the engine's RESOURCE_EXHAUSTED ("admission queue is full"). Why not
# grpc.aio: the engine hands tokens out through RequestHandle's blocking iterator (a condition
# variable), so async handlers would still park a thread per waiting stream (as the HTTP API's
# frontend.stream_pool does) or poll. Threads waiting on a condition cost little (pages of
# stack, created on demand), and the sync server keeps the grpc.Server API launchers use.
CALL_HEADROOM = 64  # calls beyond the admission limit: unary calls, probes, refusals
# Pool threads kept for refusing calls past the limit (a refusal needs a thread too), so gRPC's
# own limit, which names no cause, stays out of reach.
REFUSAL_THREADS = 8


class CallLimit:
  """At most `limit` calls inside handlers at once; one more gets RESOURCE_EXHAUSTED that says
  so (`enter` is a guard_handler gate)."""

  def __init__(self, limit: int, why: str):
    self.limit = limit
    self._why = why
    self._in_flight = 0
    self._lock = threading.Lock()

  @property
  def in_flight(self) -> int:
    return self._in_flight

  @contextlib.contextmanager
  def enter(self):
    with self._lock:
      full = self._in_flight >= self.limit
      if not full:
        self._in_flight += 1
    if full:
      limited.warning("call limit", "jblock: refused a call: %d calls in progress", self.limit)
      raise OverloadedError(f"server busy: {self.limit} calls in progress, its limit "
                            f"({self._why}); retry shortly")
    try:
      yield
    finally:
      with self._lock:
        self._in_flight -= 1


def _needs_key(full_method: str) -> bool:
  """Inference and Admin calls need a key; health probes and reflection do not."""
  service, _, method = full_method.strip("/").rpartition("/")
  return service in SERVICE_NAMES[:2] and (service, method) != (SERVICE_NAMES[0], "Health")


class FrontDoor(grpc.ServerInterceptor):
  """The client API's guard. Runs on a call's metadata before its body is read: a call that
  needs a key and lacks a valid one is refused UNAUTHENTICATED without being parsed; the
  others get their body parsed by jblock (garbage: INVALID_ARGUMENT, not gRPC's INTERNAL),
  their errors mapped to statuses with rate-limited logs, and a place under `calls`."""

  def __init__(self, frontend: frontend_lib.Frontend, calls: CallLimit):
    self._frontend = frontend
    self.calls = calls

  def intercept_service(self, continuation, handler_call_details):
    handler = continuation(handler_call_details)
    if handler is None:
      return None
    method = handler_call_details.method.rsplit("/", 1)[-1]
    if self._frontend.tenants is not None and _needs_key(handler_call_details.method):
      try:  # a SHA-256 and constant-time compares: cheap on gRPC's polling thread
        self._frontend.authenticate(key_from_metadata(handler_call_details.invocation_metadata))
      except JBlockError as e:
        if method == "Generate":
          self._frontend.observe_refused(e)  # counted as before, under "unauthenticated"
        limited.warning("unauthenticated", "jblock: %s: refused a call: %s", method, e)
        return security.reject_handler(handler, status_code(e), str(e))
    return security.guard_handler(handler, method, gate=self.calls.enter)


def build_server(engine: Engine, port: int = 0, host: str = "127.0.0.1",
                 max_workers: int | None = None,
                 *, metrics: ServingMetrics | None = None,
                 frontend: frontend_lib.Frontend | None = None,
                 max_message_bytes: int = frontend_lib.DEFAULT_MAX_REQUEST_BYTES,
                 tls: "security.ClusterCredentials | None" = None
                 ) -> tuple[CoordinatorServer, int]:
  """A server (not started yet) for `engine` on host:port (0 picks a free port).

  At most `max_workers` calls are served at once (None: the engine's admission limit plus
  CALL_HEADROOM, so the engine's queue bounds the streams); one more gets RESOURCE_EXHAUSTED
  at once, naming the limit, instead of waiting unseen in a queue. API keys are checked from
  metadata before a body is parsed (FrontDoor). Messages over `max_message_bytes` are refused
  by gRPC (RESOURCE_EXHAUSTED) before they are parsed. Serves grpc.health.v1 (NOT_SERVING once
  draining) and server reflection too.
  """
  # Metrics are counted by the frontend (both protocols); `metrics` is for a server built
  # without one.
  frontend = frontend or frontend_lib.Frontend(engine, metrics=metrics,
                                               max_request_bytes=max_message_bytes)
  if max_workers:
    calls = CallLimit(max_workers, "--max_workers")
  else:
    calls = CallLimit(engine.admission_limit() + CALL_HEADROOM,
                      "the engine's admission queue, --max_waiting, plus its running requests")
  threads = calls.limit + REFUSAL_THREADS
  server = grpc.server(
      futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jblock-rpc"),
      interceptors=[FrontDoor(frontend, calls)], maximum_concurrent_rpcs=threads,
      options=[("grpc.max_receive_message_length", max_message_bytes)])
  inference = InferenceServicer(frontend)
  admin = AdminServicer(frontend)
  pb_grpc.add_InferenceServicer_to_server(inference, server)
  pb_grpc.add_AdminServicer_to_server(admin, server)
  health = health_lib.HealthServicer()
  for service in HEALTH_SERVICES:
    health.set(service, health_pb2.HealthCheckResponse.SERVING)
  frontend.drain.on_drain(lambda: [health.set(s, health_pb2.HealthCheckResponse.NOT_SERVING)
                                   for s in HEALTH_SERVICES])
  health_pb2_grpc.add_HealthServicer_to_server(health, server)
  reflection.enable_server_reflection(SERVICE_NAMES, server)
  address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
  # TLS with `tls`'s certificate; clients present API keys, not certificates.
  bound_port = security.add_port(server, address, tls, require_client_cert=False)
  return CoordinatorServer(server, inference, admin, frontend.drain, frontend), bound_port
