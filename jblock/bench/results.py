"""Writing measurement results (tools/results/*.json) the same way from every tool."""

import json
import os
from typing import Any


def write_json(path: str, data: Any) -> None:
  """Writes `data` as indented JSON, creating the directory; no-op for an empty path."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
