"""How the coordinator reaches its workers: credentials on every channel and a deadline per RPC.

A RunBlock's deadline follows from the step it carries: the first batch of a shape on a worker
may compile (a separate, larger allowance), later ones get the steady-state allowance plus a
little per token. An expired deadline fails that batch's requests with a message naming the
deadline and the flag that sets it, instead of hanging for minutes.
"""

import dataclasses
import threading
from typing import Sequence

import grpc

from jblock.cluster import security

MESSAGE_OPTIONS = (("grpc.max_send_message_length", 256 << 20),
                   ("grpc.max_receive_message_length", 256 << 20))


@dataclasses.dataclass(frozen=True)
class StepDeadlines:
  step_s: float = 30.0  # a RunBlock of a batch shape the worker has run before
  per_token_s: float = 0.01  # added per row x token of the batch (long prefills take longer)
  first_compile_s: float = 300.0  # added to the first RunBlock of each batch shape (XLA compile)
  host_s: float = 300.0  # a HostBlock (loads the block from the worker's zoo)
  unhost_s: float = 30.0  # an UnhostBlock


class ClusterLinks:
  """Channels to workers (with this cluster's credentials) and the deadline of each RPC."""

  def __init__(self, credentials: security.ClusterCredentials | None = None,
               deadlines: StepDeadlines | None = None):
    self.credentials = credentials
    self.deadlines = deadlines or StepDeadlines()
    self._compiled: set[tuple] = set()  # (address, block id, rows, tokens) run before
    self._lock = threading.Lock()

  def channel(self, address: str, options: Sequence[tuple[str, object]] = MESSAGE_OPTIONS
              ) -> grpc.Channel:
    return security.channel(address, self.credentials, options)

  def run_deadline(self, address: str, block_id: str, rows: int, tokens: int) -> float:
    """Seconds a RunBlock of a [rows, tokens] batch may take on `address`."""
    d = self.deadlines
    timeout = d.step_s + d.per_token_s * rows * tokens
    with self._lock:
      if (address, block_id, rows, tokens) not in self._compiled:
        timeout += d.first_compile_s
    return timeout

  def ran(self, address: str, block_id: str, rows: int, tokens: int) -> None:
    """A batch of this shape completed: later ones are steady-state steps."""
    with self._lock:
      self._compiled.add((address, block_id, rows, tokens))

  @staticmethod
  def explain(e: grpc.RpcError, timeout: float) -> str:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
      return (f"DEADLINE_EXCEEDED: no answer within the step deadline of {timeout:.1f}s "
              f"(--step_deadline_s, --first_compile_deadline_s)")
    return f"{e.code().name}: {e.details()}"
