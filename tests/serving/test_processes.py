"""The CLI and the server as real processes: statuses on stderr, SIGTERM drains and exits 0."""

import pathlib
import re
import select
import signal
import subprocess
import sys
import time

from jblock.client import Client
from jblock.runtime.engine_api import SamplingParams
from jblock.runtime.mock_engine import mock_generate, mock_models
from jblock.serving import text

REPO = pathlib.Path(__file__).resolve().parents[2]


def _cli(port, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "tools.client", *args,
                           f"--server=127.0.0.1:{port}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_streams_text_and_reports_statuses(serve, engine, catalog, tokenizer):
  _, _, port = serve(engine)
  # Started together: each pays the interpreter start-up (about 1 s, mostly `import jax`
  # through jblock/__init__), in parallel.
  runs = {
      "generate": _cli(port, "generate", "--model=mock-a", "--prompt=hello world",
                       "--max_tokens=12"),
      "list": _cli(port, "list"),
      "not_found": _cli(port, "generate", "--model=nope", "--prompt=hi"),
      "no_model": _cli(port, "generate", "--prompt=hi"),
      "bad_int": _cli(port, "generate", "--model=mock-a", "--prompt=hi", "--max_tokens=many"),
  }
  done = {name: (proc.communicate(timeout=60), proc.returncode) for name, proc in runs.items()}

  (out, err), rc = done["generate"]
  prompt = text.encode(tokenizer, "hello world")
  expected, _ = mock_generate(catalog["mock-a"], prompt, SamplingParams(max_new_tokens=12))
  assert rc == 0, err
  assert out == tokenizer.decode(prompt + expected)[len("hello world"):] + "\n"
  assert f"[finish_reason=length prompt_tokens={len(prompt)} completion_tokens=12]" in err

  (out, err), rc = done["list"]
  assert rc == 0, err
  assert [line.split("\t")[0] for line in out.splitlines()] == ["mock-a", "mock-b", "mock-ids"]

  (out, err), rc = done["not_found"]
  assert rc == 1
  # Names only what the caller asked for: never the other models.
  assert err.strip() == "ERROR NOT_FOUND: model 'nope' not found"

  for name, flag in (("no_model", "--model"), ("bad_int", "--max_tokens")):
    (out, err), rc = done[name]
    assert rc != 0 and flag in err, (name, err)
    assert "Traceback" not in err


def _read_ready_line(proc: subprocess.Popen, timeout: float) -> re.Match:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 0.1)
    if ready:
      line = proc.stdout.readline()
      match = re.search(r"serving on 127\.0\.0\.1:(\d+) \(metrics port (\d+)\)", line)
      if match:
        return match
    if proc.poll() is not None:
      raise AssertionError(f"server exited early: {proc.stderr.read()}")
  raise AssertionError("server did not report ready")


def test_sigterm_drains_in_flight_requests_and_exits_0():
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", "--engine=mock", "--port=0",
       "--mock_step_delay_s=0.02", "--mock_models=m1,m2", "--drain_timeout_s=20",
       "--http_port=0"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    port = int(_read_ready_line(proc, timeout=60).group(1))
    with Client(f"127.0.0.1:{port}") as client:
      stream = client.generate("m2", prompt_tokens=[7, 8], max_tokens=40, timeout=30)
      chunks = [next(stream)]
      proc.send_signal(signal.SIGTERM)
      chunks.extend(stream)  # 40 tokens x 20 ms: most still to come after the signal
    tokens = [t for c in chunks for t in c.token_ids]
    info = mock_models(["m2"])["m2"]
    assert tokens == mock_generate(info, [7, 8], SamplingParams(max_new_tokens=40))[0]
    assert chunks[-1].finish_reason == "length"
    assert proc.wait(timeout=30) == 0
    said = proc.stdout.read()  # the operator sees the drain start and end
    assert "draining: no new requests; waiting up to 20s for 1 in flight" in said
    assert re.search(r"drained in \d+\.\ds; exiting", said), said
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()


def test_open_server_binds_loopback_only_and_says_so(tmp_path):
  import json
  import urllib.request
  bad = tmp_path / "tenants.json"
  bad.write_text(json.dumps({"admin_key_sha256": "not-a-hash", "tenants": []}))
  refused = subprocess.Popen([sys.executable, "-m", "launch.serve", "--engine=mock",
                              f"--tenants={bad}", "--port=0", "--http_port=0"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", "--engine=mock", "--host=0.0.0.0", "--port=0",
       "--http_port=0", "--mock_models=m1"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = _read_ready_line(proc, timeout=60).string  # 127.0.0.1, not 0.0.0.0
    assert "open: no --tenants" in line and "127.0.0.1 only" in line
    http_port = int(re.search(r"http on 127\.0\.0\.1:(\d+)", line).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10) as r:
      assert [m["id"] for m in json.load(r)["data"]] == ["m1"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    (_, refused_err) = refused.communicate(timeout=60)
    assert refused.returncode != 0 and "64 hex" in refused_err and "Traceback" not in refused_err
  finally:
    for p in (proc, refused):
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
      p.stdout.close()
      p.stderr.close()
