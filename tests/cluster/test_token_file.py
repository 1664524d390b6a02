"""The cluster token made when no credentials are given: created private, reused, refused when
others can read it, waited for by workers; and the launch flags around it."""

import os
import subprocess
import sys
import threading
import time

import pytest

from jblock.cluster import token_file
from jblock.errors import InvalidRequestError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_token_is_made_once_private_and_reused(tmp_path):
  path = token_file.default_path(str(tmp_path / "zoo"))
  token = token_file.ensure_token(path)
  assert len(token) == 2 * token_file.TOKEN_BYTES and int(token, 16) >= 0
  assert os.stat(path).st_mode & 0o777 == 0o600
  assert token_file.ensure_token(path) == token  # a restarted coordinator keeps it
  assert token_file.zoo_credentials(str(tmp_path / "zoo")).token == token


def test_a_token_others_can_read_or_too_short_is_refused(tmp_path):
  path = str(tmp_path / "cluster.token")
  token_file.ensure_token(path)
  os.chmod(path, 0o644)
  with pytest.raises(InvalidRequestError, match="readable by other users"):
    token_file.ensure_token(path)
  os.chmod(path, 0o600)
  with open(path, "w") as f:
    f.write("short")
  with pytest.raises(InvalidRequestError, match="a token needs >= 16"):
    token_file.wait_for_token(path, 1.0)


def test_a_worker_waits_for_the_coordinators_token(tmp_path):
  path = str(tmp_path / "cluster.token")
  said = []
  with pytest.raises(InvalidRequestError, match="no cluster token"):
    token_file.wait_for_token(path, 0.3, progress=said.append)
  assert said and path in said[0]
  maker = threading.Timer(0.3, token_file.ensure_token, args=(path,))
  maker.start()
  t0 = time.monotonic()
  token = token_file.wait_for_token(path, 10.0)
  maker.join()
  assert token == token_file.ensure_token(path) and time.monotonic() - t0 < 5


def test_an_open_cluster_must_be_asked_for_and_stays_on_loopback(tmp_path):
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "launch.worker", "--coordinator=127.0.0.1:1",
       f"--zoo={tmp_path}", "--register_timeout_s=0.5", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  refused = run("--insecure_cluster", "--host=0.0.0.0")
  assert refused.returncode == 1
  assert "--host" in refused.stderr and "no cluster credentials" in refused.stderr
  both = run("--insecure_cluster", f"--cluster_token_file={tmp_path}/t")
  assert both.returncode == 1 and "--insecure_cluster contradicts" in both.stderr
