"""Errors jblock raises on bad input; each maps to one gRPC status code in serving."""


class JBlockError(Exception):
  """Base class: every jblock error carries a message fit to show a user."""

  grpc_code = "INTERNAL"


class UnsupportedModelError(JBlockError):
  """The checkpoint's architecture or a config switch is not supported."""

  grpc_code = "INVALID_ARGUMENT"


class ConversionError(JBlockError):
  """A checkpoint tensor is missing, corrupt or of the wrong shape."""

  grpc_code = "INVALID_ARGUMENT"


class CorruptedBlockError(JBlockError):
  """A stored block does not hash to its id."""

  grpc_code = "DATA_LOSS"


class NotFoundError(JBlockError):
  """An unknown model, block or request id."""

  grpc_code = "NOT_FOUND"


class InvalidRequestError(JBlockError):
  """A request field is out of range; `field` names it."""

  grpc_code = "INVALID_ARGUMENT"

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


class OverloadedError(JBlockError):
  """Admission queue or KV capacity is full."""

  grpc_code = "RESOURCE_EXHAUSTED"


class UnavailableError(JBlockError):
  """The server is draining or a worker is gone."""

  grpc_code = "UNAVAILABLE"


class StaleBatchError(UnavailableError):
  """A batch was not run: some of its requests were paused after it was built. Nothing was
  sent, so its other rows are queued again rather than failed."""


class InstanceLostError(UnavailableError):
  """The process hosting a block instance is gone; `placement` names it (an executor key)."""

  def __init__(self, placement: str, message: str):
    super().__init__(message)
    self.placement = placement
