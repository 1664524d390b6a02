"""The status an error reaches a client with: its gRPC status name and the HTTP status for it."""

from jblock.errors import JBlockError

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}


def error_code(error: BaseException) -> str:
  """The gRPC status name of an error (INTERNAL unless it is a JBlockError naming one)."""
  return getattr(error, "grpc_code", "INTERNAL") if isinstance(error, JBlockError) else "INTERNAL"


__all__ = ["HTTP_STATUS", "error_code"]
