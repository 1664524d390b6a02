"""The coordinator's gRPC services (Inference, Admin) over any engine_api.Engine.

Every failure reaches the client as a gRPC status with a readable message (a JBlockError's
`grpc_code`, INTERNAL for bugs) and never takes the server down. A client that cancels or
misses its deadline cancels its engine request, so its KV slots are freed at once.
"""

import functools
import json
import logging
import threading
from concurrent import futures

import grpc

from jblock.errors import InvalidRequestError, JBlockError, NotFoundError
from jblock.runtime.engine_api import Engine, ModelInfo
from jblock.serving import text
from jblock.serving.metrics import ServingMetrics
from jblock.serving.proto import jblock_pb2 as pb
from jblock.serving.proto import jblock_pb2_grpc as pb_grpc

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def status_code(error: BaseException) -> grpc.StatusCode:
  """The gRPC status for an error: its `grpc_code` if it names one, else INTERNAL."""
  return getattr(grpc.StatusCode, getattr(error, "grpc_code", ""), grpc.StatusCode.INTERNAL)


def model_info_proto(info: ModelInfo) -> pb.ModelInfo:
  return pb.ModelInfo(name=info.name, family=info.family, vocab_size=info.vocab_size,
                      max_seq_len=info.max_seq_len, chain=list(info.chain),
                      has_tokenizer=bool(info.tokenizer_dir),
                      eos_token_ids=list(info.eos_token_ids))


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


def _abort_on_error(context: grpc.ServicerContext, error: Exception) -> None:
  if isinstance(error, JBlockError):
    context.abort(status_code(error), str(error))
  logging.exception("internal error serving a request")
  context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def _unary_errors(method):
  """Maps exceptions of a unary handler to gRPC statuses."""

  @functools.wraps(method)
  def handler(self, request, context):
    try:
      return method(self, request, context)
    except Exception as e:  # every error becomes a status; the server keeps serving
      _abort_on_error(context, e)

  return handler


class DrainState:
  """Counts in-flight Generate RPCs and refuses new ones once draining."""

  def __init__(self):
    self._cond = threading.Condition()
    self._draining = False
    self._in_flight = 0

  @property
  def draining(self) -> bool:
    return self._draining

  @property
  def in_flight(self) -> int:
    return self._in_flight

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

  def wait_idle(self, timeout: float) -> bool:
    """True once nothing is in flight; False if `timeout` passed first."""
    with self._cond:
      return self._cond.wait_for(lambda: self._in_flight == 0, timeout)


def _sampling_kwargs(request: pb.GenerateRequest) -> dict:
  """Only the fields the client set: unset ones keep the engine's defaults."""
  kwargs = {"stop_token_ids": tuple(request.stop_token_ids)}
  for field, name in (("max_tokens", "max_new_tokens"), ("temperature", "temperature"),
                      ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed")):
    if request.HasField(field):
      kwargs[name] = getattr(request, field)
  if request.HasField("request_id") and request.request_id:
    kwargs["request_id"] = request.request_id
  return kwargs


def _gone_status(context: grpc.ServicerContext) -> grpc.StatusCode:
  """Why an RPC ended before its last message: deadline or client cancel."""
  remaining = context.time_remaining()
  if remaining is not None and remaining <= 0:
    return grpc.StatusCode.DEADLINE_EXCEEDED
  return grpc.StatusCode.CANCELLED


class InferenceServicer(pb_grpc.InferenceServicer):
  """Generate (streaming), ListModels, Health."""

  def __init__(self, engine: Engine, *, drain: DrainState | None = None,
               tokenizers: text.TokenizerCache | None = None,
               metrics: ServingMetrics | None = None):
    self._engine = engine
    self._drain = drain or DrainState()
    self._tokenizers = tokenizers or text.TokenizerCache()
    self._metrics = metrics

  def _observe(self, status: str, handle=None) -> None:
    if self._metrics is not None:
      self._metrics.observe(status, handle)

  def _model(self, name: str) -> ModelInfo:
    if not name:
      raise InvalidRequestError("model", "is required")
    models = {info.name: info for info in self._engine.list_models()}
    if name not in models:
      raise NotFoundError(f"model {name!r} is not loaded; loaded models: {sorted(models)}")
    return models[name]

  @staticmethod
  def _prompt_tokens(request: pb.GenerateRequest, info: ModelInfo, tokenizer) -> list[int]:
    which = request.WhichOneof("prompt")
    if which == "tokens":
      return list(request.tokens.ids)
    if which == "text":
      if tokenizer is None:
        raise InvalidRequestError(
            "prompt", f"model {info.name!r} has no tokenizer; send the prompt as token ids")
      return text.encode(tokenizer, request.text)
    raise InvalidRequestError("prompt", "is empty; set text or token ids")

  def Generate(self, request, context):
    if not self._drain.try_enter():
      self._observe(grpc.StatusCode.UNAVAILABLE.name)
      context.abort(grpc.StatusCode.UNAVAILABLE,
                    "server is draining and accepts no new requests; retry on another replica")
    # Leaves the in-flight count when the RPC is over, however it ends.
    if not context.add_callback(self._drain.exit):
      self._drain.exit()
    handle, status = None, None
    try:
      info = self._model(request.model)
      tokenizer = self._tokenizers.get(info)
      prompt = self._prompt_tokens(request, info, tokenizer)
      handle = self._engine.submit(request.model, prompt, **_sampling_kwargs(request))
      # Client cancel or deadline: cancel the engine request so its KV slots are freed.
      if not context.add_callback(handle.cancel):
        handle.cancel()
      detokenizer = text.IncrementalDetokenizer(tokenizer, prompt) if tokenizer else None
      for chunk in handle.iter_chunks():
        yield pb.GenerateResponse(request_id=handle.request_id, token_ids=chunk,
                                  text=detokenizer.add(chunk) if detokenizer else "")
      if not context.is_active():
        return  # the client is gone: nobody to send the last message to
      status = grpc.StatusCode.OK
      yield pb.GenerateResponse(
          request_id=handle.request_id, text=detokenizer.flush() if detokenizer else "",
          finish_reason=_FINISH_REASONS[handle.finish_reason],
          usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(handle.tokens)))
    except Exception as e:  # every error becomes a status; the server keeps serving
      status = status_code(e) if isinstance(e, JBlockError) else grpc.StatusCode.INTERNAL
      _abort_on_error(context, e)
    finally:
      # Also reached when gRPC drops this generator because the client went away.
      if handle is not None and not handle.done:
        handle.cancel()
      self._observe((status or _gone_status(context)).name, handle)

  @_unary_errors
  def ListModels(self, request, context):
    return pb.ListModelsResponse(
        models=[model_info_proto(info) for info in self._engine.list_models()])

  @_unary_errors
  def Health(self, request, context):
    status = pb.DRAINING if self._drain.draining else pb.SERVING
    return pb.HealthResponse(status=status, models_loaded=len(self._engine.list_models()),
                             in_flight=self._drain.in_flight)


class AdminServicer(pb_grpc.AdminServicer):
  """LoadModel, UnloadModel, Stats."""

  def __init__(self, engine: Engine):
    self._engine = engine

  @_unary_errors
  def LoadModel(self, request, context):
    if not request.name:
      raise InvalidRequestError("name", "is required")
    return pb.LoadModelResponse(model=model_info_proto(self._engine.load_model(request.name)))

  @_unary_errors
  def UnloadModel(self, request, context):
    if not request.name:
      raise InvalidRequestError("name", "is required")
    self._engine.unload_model(request.name)
    return pb.UnloadModelResponse()

  @_unary_errors
  def Stats(self, request, context):
    return stats_proto(self._engine.stats())


class CoordinatorServer(grpc.Server):
  """A grpc.Server serving Inference and Admin, with a graceful `drain`."""

  def __init__(self, server: grpc.Server, inference: InferenceServicer, admin: AdminServicer,
               drain_state: DrainState):
    self._server = server
    self.inference = inference
    self.admin = admin
    self.drain_state = drain_state

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


def build_server(engine: Engine, port: int = 0, host: str = "127.0.0.1", max_workers: int = 64,
                 *, metrics: ServingMetrics | None = None) -> tuple[CoordinatorServer, int]:
  """A server (not started yet) for `engine` on host:port (0 picks a free port).

  Each streaming Generate holds one of `max_workers` threads while it runs; RPCs beyond
  that get RESOURCE_EXHAUSTED at once instead of waiting unseen in a queue.
  """
  server = grpc.server(
      futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jblock-rpc"),
      maximum_concurrent_rpcs=max_workers)
  drain_state = DrainState()
  inference = InferenceServicer(engine, drain=drain_state, metrics=metrics)
  admin = AdminServicer(engine)
  pb_grpc.add_InferenceServicer_to_server(inference, server)
  pb_grpc.add_AdminServicer_to_server(admin, server)
  address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
  bound_port = server.add_insecure_port(address)
  if not bound_port:
    raise OSError(f"cannot listen on {address}")
  return CoordinatorServer(server, inference, admin, drain_state), bound_port
