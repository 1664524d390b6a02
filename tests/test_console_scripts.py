"""The installed console scripts (pyproject's [project.scripts]) list their flags on --help, as
`python -m` does, and exit 0; a bad flag still exits 1 naming it."""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
SCRIPTS = {"jblock-serve": ["--zoo", "--max_waiting", "--tenants", "--http_port"],
           "jblock-client": ["--server", "--retry_s", "--api_key"],
           "jblock-zoo": ["--zoo"]}


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "jblock-serve")),
                    reason="the package is not installed with its console scripts")
def test_console_scripts_list_their_flags_and_help_exits_0():
  runs = {name: subprocess.Popen([os.path.join(BIN, name), "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
          for name in SCRIPTS}
  bad = subprocess.Popen([os.path.join(BIN, "jblock-client"), "--no_such_flag"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for name, proc in runs.items():
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, (name, out)
    assert all(f"  {flag}:" in out or f"  {flag} " in out for flag in SCRIPTS[name]), (name, out)
  out, _ = bad.communicate(timeout=120)
  assert bad.returncode == 1 and "no_such_flag" in out
