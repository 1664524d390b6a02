"""The cluster token a coordinator makes when no credentials are given, and where workers find it.

With no --cluster_token_file and no --tls_* flags, the coordinator creates a random token in
`<zoo>/cluster.token` (mode 0600: only its user can read it) or reuses the one already there, so a
restarted coordinator keeps the token its workers hold. A worker started on the same host with
the same --zoo reads that file (waiting for it when it starts first). Workers on other hosts get a
copy of the file and pass it as --cluster_token_file.

A token file that someone else owns, or that other users may read, is refused: whoever can read
it can drive the cluster.
"""

import os
import secrets
import stat
import time
from typing import Callable

from jblock.cluster.security import ClusterCredentials
from jblock.errors import InvalidRequestError

TOKEN_NAME = "cluster.token"
TOKEN_BYTES = 32  # written as 64 hex characters


def default_path(zoo_dir: str) -> str:
  return os.path.join(zoo_dir, TOKEN_NAME)


def _check_private(path: str, flag: str) -> None:
  info = os.stat(path)
  if info.st_uid != os.getuid():
    raise InvalidRequestError(flag, f"{path} belongs to another user (uid {info.st_uid}): "
                              "a cluster token must be this user's own")
  if stat.S_IMODE(info.st_mode) & 0o077:
    raise InvalidRequestError(flag, f"{path} is readable by other users (mode "
                              f"{stat.S_IMODE(info.st_mode):o}): chmod 600 it or remove it")


def _read(path: str, flag: str) -> bytes:
  _check_private(path, flag)
  with open(path, "rb") as f:
    token = f.read().strip()
  if len(token) < 16:
    raise InvalidRequestError(flag, f"{path} holds {len(token)} bytes; a token needs >= 16 "
                              "(remove the file to have a new one made)")
  return token


def ensure_token(path: str, flag: str = "--zoo") -> bytes:
  """The token in `path`, created (0600, atomically) when missing."""
  try:
    return _read(path, flag)
  except FileNotFoundError:
    pass
  token = secrets.token_hex(TOKEN_BYTES).encode()
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:  # another coordinator made it first: use theirs
    return _read(path, flag)
  except OSError as e:
    raise InvalidRequestError(flag, f"cannot create the cluster token {path}: {e.strerror} "
                              "(pass --cluster_token_file)") from None
  with os.fdopen(fd, "wb") as f:
    f.write(token + b"\n")
  return token


def wait_for_token(path: str, timeout_s: float, flag: str = "--zoo",
                   progress: Callable[[str], None] = lambda _: None) -> bytes:
  """The token in `path`, waiting up to `timeout_s` for a coordinator to create it."""
  deadline = time.monotonic() + timeout_s
  said = False
  while True:
    try:
      return _read(path, flag)
    except FileNotFoundError:
      if time.monotonic() >= deadline:
        raise InvalidRequestError(
            flag, f"no cluster token at {path} after {timeout_s:g}s: start the coordinator "
            "with the same --zoo on this host, or pass --cluster_token_file") from None
      if not said:
        progress(f"jblock: waiting for the coordinator's cluster token at {path}")
        said = True
      time.sleep(0.2)


def zoo_credentials(zoo_dir: str) -> ClusterCredentials:
  """What launch.coordinator uses with no credential flags: the zoo's token, made if missing
  (for coordinators built in process whose workers are `launch.worker --zoo=zoo_dir`)."""
  return ClusterCredentials(token=ensure_token(default_path(zoo_dir)))
