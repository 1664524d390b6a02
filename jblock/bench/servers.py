"""Starting, measuring and stopping benchmark server processes."""

import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Sequence

_READY = re.compile(r"serving on ([\d.]+):(\d+) ")


def stop_process(proc: subprocess.Popen, grace_s: float = 0.0) -> int | None:
  """Stops a child process: SIGTERM and up to `grace_s` seconds to exit (0: no grace), then
  SIGKILL; closes its stdout pipe if it has one. Returns its exit status."""
  if proc.poll() is None and grace_s > 0:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      pass
  if proc.poll() is None:
    proc.kill()
  proc.wait(30.0)
  if proc.stdout:
    proc.stdout.close()
  return proc.returncode


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  # Tests force several host devices; a bench server uses one, like a real CPU deployment.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  env.setdefault("HF_HUB_OFFLINE", "1")
  env.setdefault("TRANSFORMERS_OFFLINE", "1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


class ServerProcess:
  """`python -m jblock.bench.server_proc ARGS` until stop(); a context manager.

  The process starts at construction; wait_ready() returns once it listens, so several
  servers can load and compile at the same time.
  """

  def __init__(self, args: Sequence[str], cwd: str | None = None, log_path: str | None = None):
    self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
    self.proc = subprocess.Popen([sys.executable, "-m", "jblock.bench.server_proc", *args],
                                 cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                                 stderr=self._log, text=True)
    self.port = None
    self.target = None

  def wait_ready(self, timeout_s: float = 900.0) -> str:
    """The server's address once it serves; stops it and raises if it dies or times out."""
    try:
      self.port = self._wait_ready(timeout_s)
    except BaseException:
      self.stop()
      raise
    self.target = f"127.0.0.1:{self.port}"
    return self.target

  def _wait_ready(self, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
      if ready:
        line = self.proc.stdout.readline()
        match = _READY.search(line)
        if match:
          return int(match.group(2))
      if self.proc.poll() is not None:
        raise RuntimeError(f"bench server exited with {self.proc.returncode} before serving "
                           f"(see {getattr(self._log, 'name', 'its stderr')})")
    raise TimeoutError(f"bench server not ready after {timeout_s:.0f}s")

  def memory(self) -> dict[str, int]:
    """Peak (VmHWM) and current (VmRSS) resident memory of the server process, in bytes."""
    out = {}
    try:
      with open(f"/proc/{self.proc.pid}/status") as f:
        for line in f:
          key, _, value = line.partition(":")
          if key in ("VmHWM", "VmRSS"):
            out["peak_rss_bytes" if key == "VmHWM" else "rss_bytes"] = int(value.split()[0]) * 1024
    except OSError:
      pass  # not Linux, or already gone: memory is then simply not reported
    return out

  def stop(self, timeout_s: float = 30.0) -> int | None:
    """SIGTERM (the server drains), wait, then SIGKILL if it is still there."""
    stop_process(self.proc, timeout_s)
    if self._log is not subprocess.DEVNULL:
      self._log.close()
    return self.proc.returncode

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
