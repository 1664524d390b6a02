"""Who may talk to a cluster's processes: a shared cluster token and/or mutual TLS.

Every internal RPC (coordinator -> worker BlockHost, worker -> coordinator Registry, worker ->
worker) carries the cluster token as metadata; servers check it in constant time before any
handler runs or any body is parsed and answer UNAUTHENTICATED otherwise; a body that is not the
method's message gets INVALID_ARGUMENT (jblock parses it, not gRPC), and repeated failures are
logged rate-limited (jblock.log_limits). With TLS configured, servers present their
certificate and require the peer's, both signed by the cluster's CA. A process configured with
neither listens on 127.0.0.1 only (`bind_host`), so only local callers can reach it.

Client-facing ports (Inference, Admin, HTTP) take the same certificate and key but do not ask
for client certificates: tenants' API keys identify callers there.
"""

import contextlib
import dataclasses
import hmac
import ipaddress
import logging
from typing import Callable, Sequence

import grpc

from jblock.errors import InvalidRequestError, JBlockError
from jblock.log_limits import limited

TOKEN_METADATA = "x-jblock-cluster-token"
LOOPBACK = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class ClusterCredentials:
  token: bytes | None = None  # the shared cluster token; None = no token check
  cert: bytes | None = None  # this process's PEM certificate chain (TLS)
  key: bytes | None = None  # its PEM private key
  ca: bytes | None = None  # PEM CA that signs every member's certificate
  cert_path: str | None = None  # where `cert` was read from (uvicorn's TLS takes files)
  key_path: str | None = None  # where `key` was read from

  @property
  def tls(self) -> bool:
    return self.cert is not None

  @property
  def configured(self) -> bool:
    return self.token is not None or self.tls

  def describe(self) -> str:
    parts = (["cluster token"] if self.token is not None else []) + (["mutual TLS"] if self.tls else [])
    return " + ".join(parts) or "no credentials"


def _read(path: str, flag: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InvalidRequestError(flag, f"cannot read {path}: {e.strerror}") from None


def load_credentials(token_file: str | None = None, cert: str | None = None,
                     key: str | None = None, ca: str | None = None) -> ClusterCredentials:
  """Credentials from files; InvalidRequestError naming the flag (--tls_cert, ...) on bad input."""
  token = None
  if token_file:
    token = _read(token_file, "--cluster_token_file").strip()
    if len(token) < 16:
      raise InvalidRequestError("--cluster_token_file",
                                f"{token_file} holds {len(token)} bytes; a token needs >= 16")
  given = {"--tls_cert": cert, "--tls_key": key, "--tls_ca": ca}
  if any(given.values()) and not all(given.values()):
    missing = ", ".join(f for f, v in given.items() if not v)
    raise InvalidRequestError(missing.split(",")[0], f"TLS needs --tls_cert, --tls_key and "
                              f"--tls_ca together; missing {missing}")
  if not cert:
    return ClusterCredentials(token=token)
  pems = {flag: _read(path, flag) for flag, path in given.items()}
  for flag, pem in pems.items():
    if b"-----BEGIN" not in pem:
      raise InvalidRequestError(flag, f"{given[flag]} is not a PEM file")
  return ClusterCredentials(token, pems["--tls_cert"], pems["--tls_key"], pems["--tls_ca"],
                            cert_path=cert, key_path=key)


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


def bind_host(host: str, credentials: ClusterCredentials | None, what: str, flag: str = "--host",
              log: Callable[[str], None] = logging.warning) -> str:
  """The address an internal port may bind: any with credentials; loopback only without, and
  a non-loopback `host` is refused (InvalidRequestError naming `flag`)."""
  if credentials is not None and credentials.configured:
    return host
  if not is_loopback(host):
    raise InvalidRequestError(flag, f"{host!r} is reachable from other machines but no cluster "
                              f"credentials are set: pass --cluster_token_file and/or "
                              f"--tls_cert/--tls_key/--tls_ca, or listen on {LOOPBACK}")
  log(f"jblock: {what} has no cluster credentials: listening on {LOOPBACK} only")
  return LOOPBACK


# ---- servers ----------------------------------------------------------------------------------


def _same_kind(handler: grpc.RpcMethodHandler, unary_fn, stream_fn, response_serializer):
  """A handler of `handler`'s kind over raw request bytes (request_deserializer None): gRPC
  never parses a body itself, so a garbage body cannot reach its "Exception deserializing
  request" path (INTERNAL and a traceback per call); jblock parses it in `guard_handler`."""
  kwargs = dict(request_deserializer=None, response_serializer=response_serializer)
  if handler.unary_unary:
    return grpc.unary_unary_rpc_method_handler(unary_fn, **kwargs)
  if handler.unary_stream:
    return grpc.unary_stream_rpc_method_handler(stream_fn, **kwargs)
  if handler.stream_unary:
    return grpc.stream_unary_rpc_method_handler(unary_fn, **kwargs)
  return grpc.stream_stream_rpc_method_handler(stream_fn, **kwargs)


def reject_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
  """A handler of the same kind as `handler` that aborts every call with `code`, without
  reading the request body."""
  def abort(request_or_iterator, context):
    context.abort(code, message)

  return _same_kind(handler, abort, abort, handler.response_serializer)



def _status(error: Exception) -> grpc.StatusCode:
  return getattr(grpc.StatusCode, getattr(error, "grpc_code", ""), grpc.StatusCode.INTERNAL)


def _message_name(deserializer) -> str:
  """'jblock.v1.GenerateRequest' for GenerateRequest.FromString."""
  owner = getattr(deserializer, "__self__", None)
  descriptor = getattr(owner, "DESCRIPTOR", None)
  return getattr(descriptor, "full_name", None) or "request message"


def _parser(deserializer, method: str):
  """Raw bytes -> the request message; InvalidRequestError naming the message when the bytes
  are not one (protobuf's DecodeError, or anything else the deserializer raises)."""
  if deserializer is None:
    return lambda raw: raw
  name = _message_name(deserializer)

  def parse(raw):
    try:
      return deserializer(raw)
    except Exception:  # DecodeError; message text from the parser is not for clients
      limited.warning(f"{method}: bad body", "jblock: %s: refused a %d-byte body that is not "
                      "a valid %s", method, len(raw), name)
      raise InvalidRequestError("request", f"the body of {method} is not a valid {name} "
                                f"({len(raw)} bytes)") from None
  return parse


def guard_handler(handler: grpc.RpcMethodHandler, method: str, gate=None):
  """`handler` reading raw bytes and parsing them itself (a bad body: INVALID_ARGUMENT), with
  JBlockErrors turned into their status and unexpected exceptions into INTERNAL plus a
  rate-limited log line (no traceback per call, no UNKNOWN); aborts the handler itself made
  pass through unchanged. `gate`: a context manager factory entered around each call (it may
  raise a JBlockError, e.g. OverloadedError, to refuse the call)."""
  parse = _parser(handler.request_deserializer, method)
  gate = gate or contextlib.nullcontext

  def failed(context, e: Exception):
    if isinstance(e, JBlockError):  # a bad field or a refusal: the status the error names
      context.abort(_status(e), str(e))
    if context.code() is not None:  # context.abort() raised: the status is already set
      raise e
    limited.error(f"{method}: {type(e).__name__}", "jblock: %s failed: %s: %s", method,
                  type(e).__name__, e)
    context.abort(grpc.StatusCode.INTERNAL, f"{method}: {type(e).__name__}: {e}")

  def request(raw_or_iterator, streaming: bool):
    if streaming:
      return (parse(raw) for raw in raw_or_iterator)
    return parse(raw_or_iterator)

  def wrap(fn, streaming):
    def call(raw_or_iterator, context):
      try:
        with gate():
          return fn(request(raw_or_iterator, streaming), context)
      except Exception as e:
        failed(context, e)
    return call

  def wrap_stream(fn, streaming):
    def call(raw_or_iterator, context):
      try:
        with gate():
          yield from fn(request(raw_or_iterator, streaming), context)
      except Exception as e:
        failed(context, e)
    return call

  if handler.unary_unary:
    unary, stream = wrap(handler.unary_unary, False), None
  elif handler.unary_stream:
    unary, stream = None, wrap_stream(handler.unary_stream, False)
  elif handler.stream_unary:
    unary, stream = wrap(handler.stream_unary, True), None
  else:
    unary, stream = None, wrap_stream(handler.stream_stream, True)
  return _same_kind(handler, unary, stream, handler.response_serializer)



def metadata_value(metadata, key: str):
  """The first value of `key` in a call's invocation metadata (None when absent)."""
  for k, value in metadata or ():
    if k == key:
      return value
  return None


class ClusterGuard(grpc.ServerInterceptor):
  """Refuses calls without the cluster token (UNAUTHENTICATED) before any handler runs or any
  body is parsed, parses the bodies of the calls it lets in (garbage: INVALID_ARGUMENT), and
  keeps handler crashes from surfacing as UNKNOWN."""

  def __init__(self, token: bytes | None):
    self._token = token

  def intercept_service(self, continuation, handler_call_details):
    handler = continuation(handler_call_details)
    if handler is None:
      return None
    method = handler_call_details.method.rsplit("/", 1)[-1]
    if self._token is not None:
      sent = metadata_value(handler_call_details.invocation_metadata, TOKEN_METADATA) or b""
      sent = sent.encode() if isinstance(sent, str) else sent
      if not hmac.compare_digest(sent, self._token):
        limited.warning("cluster token refused", "jblock: %s: refused a call without the "
                        "cluster token", method)
        return reject_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                              f"{method}: missing or wrong cluster token ({TOKEN_METADATA})")
    return guard_handler(handler, method)


def server_interceptors(credentials: ClusterCredentials | None) -> list[grpc.ServerInterceptor]:
  """Pass as grpc.server(..., interceptors=...) for every internal server."""
  return [ClusterGuard(credentials.token if credentials else None)]


def add_port(server: grpc.Server, address: str, credentials: ClusterCredentials | None,
             require_client_cert: bool = True) -> int:
  """Binds `address`: TLS (client certificates required unless told otherwise) when configured,
  plaintext otherwise. Returns the bound port; OSError when it cannot bind."""
  if credentials is not None and credentials.tls:
    ssl = grpc.ssl_server_credentials(
        [(credentials.key, credentials.cert)], root_certificates=credentials.ca,
        require_client_auth=require_client_cert)
    port = server.add_secure_port(address, ssl)
  else:
    port = server.add_insecure_port(address)
  if not port:
    raise OSError(f"cannot listen on {address}")
  return port


# ---- clients ----------------------------------------------------------------------------------


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
  """Adds the cluster token to every call's metadata."""

  def __init__(self, token: bytes):
    self._entry = (TOKEN_METADATA, token.decode("ascii", "replace"))

  def _details(self, details):
    metadata = list(details.metadata or ()) + [self._entry]
    return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

  def intercept_unary_unary(self, continuation, details, request):
    return continuation(self._details(details), request)

  def intercept_unary_stream(self, continuation, details, request):
    return continuation(self._details(details), request)

  def intercept_stream_unary(self, continuation, details, request_iterator):
    return continuation(self._details(details), request_iterator)

  def intercept_stream_stream(self, continuation, details, request_iterator):
    return continuation(self._details(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
  method: str
  timeout: float | None
  metadata: Sequence | None
  credentials: grpc.CallCredentials | None
  wait_for_ready: bool | None
  compression: object | None


def channel(address: str, credentials: ClusterCredentials | None,
            options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
  """A channel to another member of the cluster, presenting this process's credentials."""
  if credentials is not None and credentials.tls:
    ssl = grpc.ssl_channel_credentials(root_certificates=credentials.ca,
                                       private_key=credentials.key,
                                       certificate_chain=credentials.cert)
    ch = grpc.secure_channel(address, ssl, options=list(options))
  else:
    ch = grpc.insecure_channel(address, options=list(options))
  if credentials is not None and credentials.token is not None:
    ch = grpc.intercept_channel(ch, _TokenInterceptor(credentials.token))
  return ch
