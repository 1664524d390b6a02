"""Flags for who may talk to a jblock cluster and how long each internal RPC may take.

Shared by launch.coordinator and launch.worker (all of them) and launch.serve (the TLS ones,
for its client-facing ports).
"""

from absl import app
from absl import flags

from jblock.cluster import security
from jblock.cluster.links import ClusterLinks, StepDeadlines
from jblock.errors import InvalidRequestError

_TOKEN_FILE = flags.DEFINE_string(
    "cluster_token_file", None, "File holding the cluster's shared token (>= 16 bytes); every "
    "internal RPC and registration must carry it.")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate this process presents.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_TLS_CA = flags.DEFINE_string("tls_ca", None, "PEM CA that signed every cluster member's "
                              "certificate (peers must present one).")
_STEP_DEADLINE_S = flags.DEFINE_float(
    "step_deadline_s", StepDeadlines.step_s, "Deadline of one RunBlock of an already compiled "
    "batch shape.", lower_bound=0.001)
_FIRST_COMPILE_S = flags.DEFINE_float(
    "first_compile_deadline_s", StepDeadlines.first_compile_s, "Extra time for the first "
    "RunBlock of each batch shape on a worker (XLA compile).", lower_bound=0.0)
_HOST_DEADLINE_S = flags.DEFINE_float(
    "host_block_deadline_s", StepDeadlines.host_s, "Deadline of a HostBlock (a worker loads "
    "the block from its zoo).", lower_bound=0.001)


def credentials() -> security.ClusterCredentials:
  """The credentials the flags name; a UsageError naming the flag when a file is bad."""
  try:
    return security.load_credentials(_TOKEN_FILE.value, _TLS_CERT.value, _TLS_KEY.value,
                                     _TLS_CA.value)
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None


def links() -> ClusterLinks:
  return ClusterLinks(credentials(), StepDeadlines(
      step_s=_STEP_DEADLINE_S.value, first_compile_s=_FIRST_COMPILE_S.value,
      host_s=_HOST_DEADLINE_S.value))


def bind_host(host: str, creds: security.ClusterCredentials, what: str, **log) -> str:
  """`host`, or a UsageError when it is not loopback and no credentials are set."""
  try:
    return security.bind_host(host, creds, what, **log)
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None
