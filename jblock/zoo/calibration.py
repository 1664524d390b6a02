"""Calibration data for equivalence evaluation: token windows for fitting and held-out checks.

The demo corpus (jblock/train/demo_corpus.txt) by default; any text file (tokenized with the
model's tokenizer.json, or as UTF-8 bytes when the model has none and its vocabulary holds 256
byte ids), or token ids in a .npy or .json file. The token stream is cut into a calibration
("fit") part and a held-out tail ("holdout"), each into windows of seq_len tokens; a split's
hash keys the equivalence records measured on it.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from jblock.errors import InvalidRequestError

DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "train", "demo_corpus.txt")
FIT, HOLDOUT = "fit", "holdout"


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Token windows [N, T] int32 for fitting (choosing substitutions) and for held-out checks."""
  fit: np.ndarray
  holdout: np.ndarray
  source: str

  def split(self, name: str) -> np.ndarray:
    if name not in (FIT, HOLDOUT):
      raise ValueError(f"split must be {FIT!r} or {HOLDOUT!r}, got {name!r}")
    windows = self.fit if name == FIT else self.holdout
    if windows.shape[0] == 0:
      raise InvalidRequestError("calibration", f"the calibration set has no {name} windows "
                                "(more tokens or a larger holdout fraction needed)")
    return windows

  def describe(self, name: str) -> dict[str, Any]:
    windows = self.split(name)
    return {"split": name, "hash": windows_hash(windows), "source": self.source,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def windows_hash(windows: np.ndarray) -> str:
  arr = np.ascontiguousarray(windows, dtype="<i4")
  h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
  h.update(arr.tobytes())
  return h.hexdigest()[:32]


def _windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
  n = stream.size // seq_len
  windows = stream[:n * seq_len].reshape(n, seq_len)
  if n > max_windows:  # evenly spread over the text, not just its start
    windows = windows[np.linspace(0, n - 1, max_windows).round().astype(int)]
  return windows


def make_calibration(tokens, seq_len: int = 64, max_windows: int = 64, holdout: float = 0.25,
                     source: str = "tokens") -> Calibration:
  """Windows from a token stream (1-D, or a list of sequences, concatenated): the first
  (1 - holdout) of the stream for fitting, the tail held out; at most max_windows each."""
  if isinstance(tokens, (list, tuple)) and tokens and np.ndim(tokens[0]) == 1:
    tokens = np.concatenate([np.asarray(t, np.int64) for t in tokens])
  stream = np.asarray(tokens, np.int64).reshape(-1)
  if not 0.0 <= holdout < 1.0:
    raise InvalidRequestError("holdout", f"must be in [0, 1), got {holdout}")
  if seq_len < 2 or max_windows < 1:
    raise InvalidRequestError("seq_len", f"seq_len must be >= 2 and max_windows >= 1, got "
                              f"{seq_len} and {max_windows}")
  cut = stream.size - int(round(stream.size * holdout))
  fit_part, held_part = stream[:cut], stream[cut:]
  t = min(seq_len, fit_part.size, held_part.size if holdout > 0 else fit_part.size)
  if t < 2:
    raise InvalidRequestError("calibration", f"{stream.size} tokens are too few for a "
                              f"calibration split with holdout {holdout}")
  fit = _windows(fit_part, t, max_windows).astype(np.int32)
  held = (_windows(held_part, t, max_windows) if holdout > 0
          else np.zeros((0, t), np.int64)).astype(np.int32)
  return Calibration(fit, held, source)


def read_tokens(path: str, vocab_size: int, tokenizer_dir: str | None) -> np.ndarray:
  """Token ids from a .npy / .json file, or a text file tokenized for the model."""
  if not os.path.isfile(path):
    raise InvalidRequestError("calibration", f"{path}: no such file")
  if path.endswith(".npy"):
    tokens = np.load(path).reshape(-1)
  elif path.endswith(".json"):
    with open(path) as f:
      data = json.load(f)
    parts = data if data and isinstance(data[0], list) else [data]
    tokens = np.concatenate([np.asarray(p, np.int64) for p in parts])
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    tokenizer_file = os.path.join(tokenizer_dir, "tokenizer.json") if tokenizer_dir else None
    if tokenizer_file and os.path.isfile(tokenizer_file):
      from tokenizers import Tokenizer
      tokens = np.asarray(Tokenizer.from_file(tokenizer_file).encode(text).ids, np.int64)
    elif vocab_size >= 256:
      tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    else:
      raise InvalidRequestError("calibration", f"the model has no tokenizer.json and a "
                                f"{vocab_size}-token vocabulary: pass token ids (.npy or .json)")
  tokens = np.asarray(tokens, np.int64)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise InvalidRequestError("calibration", f"{path}: token ids must be in [0, {vocab_size})")
  return tokens


__all__ = ["Calibration", "DEFAULT_CALIBRATION", "FIT", "HOLDOUT", "make_calibration",
           "read_tokens", "windows_hash"]
