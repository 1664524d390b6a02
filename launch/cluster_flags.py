"""Flags for who may talk to a jblock cluster and how long each internal RPC may take.

Shared by launch.coordinator and launch.worker (all of them) and launch.serve (the TLS ones,
for its client-facing ports).

Credentials by default: with neither --cluster_token_file nor --tls_*, the coordinator makes a
random token in `<zoo>/cluster.token` (0600; reused when it restarts) and workers on the same
host with the same --zoo read it (jblock.cluster.token_file). --insecure_cluster turns the
checks off, on 127.0.0.1 only.
"""

import logging

from absl import app
from absl import flags

from jblock.cluster import security
from jblock.cluster import token_file
from jblock.cluster.links import ClusterLinks, StepDeadlines
from jblock.errors import InvalidRequestError

_TOKEN_FILE = flags.DEFINE_string(
    "cluster_token_file", None, "File holding the cluster's shared token (>= 16 bytes); every "
    "internal RPC and registration must carry it.")
_INSECURE = flags.DEFINE_boolean(
    "insecure_cluster", False, "No cluster token and no TLS: every local process may call the "
    "internal RPCs (run blocks, unhost them, register workers). Listens on 127.0.0.1 only.")
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


def given_credentials() -> security.ClusterCredentials:
  """The credentials the flags name (none when none are given); a UsageError naming the flag
  when a file is bad."""
  try:
    return security.load_credentials(_TOKEN_FILE.value, _TLS_CERT.value, _TLS_KEY.value,
                                     _TLS_CA.value)
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None


def credentials(zoo_dir: str, wait_s: float = 0.0, progress=logging.info
                ) -> security.ClusterCredentials:
  """A cluster member's credentials: the flags', else the zoo's token (made here when
  `wait_s` is 0, the coordinator; waited for up to `wait_s` otherwise, a worker), else none
  with --insecure_cluster (and a warning)."""
  if _INSECURE.value:
    if any((_TOKEN_FILE.value, _TLS_CERT.value, _TLS_KEY.value, _TLS_CA.value)):
      raise app.UsageError("--insecure_cluster contradicts --cluster_token_file / --tls_*: "
                           "pass one or the other")
    logging.warning("jblock: --insecure_cluster: no cluster token or TLS; any local process may "
                    "run, unhost or register blocks")
    return security.ClusterCredentials()
  given = given_credentials()
  if given.configured:
    return given
  path = token_file.default_path(zoo_dir)
  try:
    token = (token_file.wait_for_token(path, wait_s, progress=progress) if wait_s > 0
             else token_file.ensure_token(path))
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None
  return security.ClusterCredentials(token=token)


def links(zoo_dir: str) -> ClusterLinks:
  return ClusterLinks(credentials(zoo_dir), StepDeadlines(
      step_s=_STEP_DEADLINE_S.value, first_compile_s=_FIRST_COMPILE_S.value,
      host_s=_HOST_DEADLINE_S.value))


def bind_host(host: str, creds: security.ClusterCredentials, what: str, **log) -> str:
  """`host`, or a UsageError when it is not loopback and no credentials are set."""
  try:
    return security.bind_host(host, creds, what, **log)
  except InvalidRequestError as e:
    raise app.UsageError(str(e)) from None
