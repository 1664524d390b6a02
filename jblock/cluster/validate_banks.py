"""Checks of what a coordinator asks of a worker's adapter bank: its LoRA targets and
compressed-delta layout (HostBlockRequest.lora_bank), a slot's factors (InstallAdapter) and a
batch's bank columns (RunBlock). Every check names the field it refuses."""

from typing import Any

import jax
import numpy as np

from jblock.errors import InvalidRequestError
from jblock.models import qdelta
from jblock.models.deltas import kernel_leaf
from jblock.proto.tensor_codec import from_tensor
from jblock.cluster.validate import HostLimits, _range, _tensor



def _lora_entry(held: dict) -> dict | None:
  return next((e for e in held.values() if "a" in e), None)


def _bank_slots(held: dict) -> int:
  return int(jax.tree.leaves(held)[0].shape[0])


def lora_bank(bank, shapes: dict[str, tuple[int, int]], itemsize: int,
              limits: HostLimits = HostLimits()) -> list[str]:
  """HostBlockRequest.lora_bank against the block's projections (`shapes`: target -> (in, out));
  returns its LoRA targets (none when it banks compressed deltas only)."""
  _range("lora_bank.slots", bank.slots, 1, limits.max_lora_slots)
  if not bank.targets and not bank.deltas:
    raise InvalidRequestError("lora_bank.targets", "at least one projection is required")
  if not bank.targets:
    return []
  _range("lora_bank.max_rank", bank.max_rank, 1, limits.max_lora_rank)
  for i, target in enumerate(bank.targets):
    if target not in shapes:
      raise InvalidRequestError(f"lora_bank.targets[{i}]", f"{target[:80]!r} is not a projection "
                                f"of this block (it has {', '.join(sorted(shapes)) or 'none'})")
  need = sum(bank.slots * bank.max_rank * sum(shapes[t]) * itemsize for t in set(bank.targets))
  if need > limits.max_lora_bank_bytes:
    raise InvalidRequestError("lora_bank", f"the bank needs {need} bytes, over this worker's "
                              f"{limits.max_lora_bank_bytes}")
  return list(bank.targets)


def bank_matches(bank, held: dict) -> None:
  """A bank asked for again keeps the shape the block's bank already has."""
  if bank.slots != _bank_slots(held):
    raise InvalidRequestError("lora_bank.slots", f"{bank.slots}, but the block's bank has "
                              f"{_bank_slots(held)} slots")
  entry = _lora_entry(held)
  if entry is None or not bank.targets:
    return
  slots, rank = entry["a"].shape[:2]
  if (bank.slots, bank.max_rank) != (slots, rank):
    raise InvalidRequestError("lora_bank", f"{bank.slots} slots x rank {bank.max_rank}, but the "
                              f"block's bank is {slots} x {rank}")


def install_adapter(request, held: dict | None) -> dict[str, dict[str, Any]]:
  """An InstallAdapterRequest against the block's bank (`held`: path -> entry of device arrays
  with a leading slot dim; jblock.models.deltas). Returns one slot's factors: LoRA
  target -> {"a": [R, in], "b": [R, out]}, compressed deltas entry -> {key: {array: value}}."""
  if not held:
    raise InvalidRequestError("block_id", f"{request.block_id[:80]!r} holds no adapter bank "
                              "(host it with lora_bank first)")
  _range("slot", request.slot, 0, _bank_slots(held) - 1)
  factors: dict[str, dict[str, Any]] = {}
  for name in sorted(request.factors.keys()):
    field = f"factors[{name[:80]!r}]"
    target, _, which = name.rpartition("/")
    entry, _, key = target.rpartition("/")
    if which in ("a", "b") and "a" in held.get(target, {}):
      banked = held[target][which]
    elif isinstance(held.get(entry, {}).get(key), dict) and which in held[entry][key]:
      banked = held[entry][key][which]
    else:
      raise InvalidRequestError(field, "expected '<target>/a' or '<target>/b' for a LoRA target, "
                                "or '<entry>/<encoding or leaf>/<array>' for a banked delta")
    try:
      value = from_tensor(request.factors[name])
    except InvalidRequestError as e:
      raise InvalidRequestError(field, str(e).split(": ", 1)[-1]) from None
    want = tuple(banked.shape[1:])
    kind_ok = (value.dtype.kind == "f") if which in ("a", "b") else value.dtype == banked.dtype
    if not kind_ok or value.shape != want:
      raise InvalidRequestError(field, f"{banked.dtype} {list(want)} expected, got "
                                f"{value.dtype.name} {list(value.shape)}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
      raise InvalidRequestError(field, "values must be finite")
    if which == "on" and int(value) not in (0, 1):
      raise InvalidRequestError(field, "0 or 1 expected")
    if which in ("a", "b"):
      factors.setdefault(target, {})[which] = value
    else:
      factors.setdefault(entry, {}).setdefault(key, {})[which] = value
  for target, pair in factors.items():
    if ("a" in pair or "b" in pair) and not ("a" in pair and "b" in pair):
      missing = "b" if "a" in pair else "a"
      raise InvalidRequestError(f"factors['{target}/{missing}']", "missing (a target needs both "
                                "factors)")
  return factors


def delta_layout(bank, params: dict[str, Any], limits: HostLimits = HostLimits()
                 ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """HostBlockRequest.lora_bank.deltas ("<entry>/<encoding or leaf>/<array>" -> dtype and one
  slot's shape) against the block's params: exactly the arrays a compressed fine-tune of this
  block has there. Returns entry -> key -> array -> zeros of one slot (the bank to grow)."""
  leaves = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      path = f"{prefix}/{k}" if prefix else k
      if isinstance(v, dict):
        walk(v, path)
      else:
        leaves[path] = tuple(np.shape(v))

  walk(params, "")
  out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  need = 0
  for name in sorted(bank.deltas.keys()):
    field = f"lora_bank.deltas[{name[:80]!r}]"
    target, _, array = name.rpartition("/")
    entry, _, key = target.rpartition("/")
    if key in qdelta.METHODS and kernel_leaf(entry) in leaves:
      d_in, d_out = leaves[kernel_leaf(entry)]
      expected = {k: (tuple(s), d) for k, (s, d) in qdelta.layout(key, d_in, d_out).items()}
    elif f"{entry}/{key}" in leaves:
      expected = {"value": (leaves[f"{entry}/{key}"], np.dtype(np.float32))}
    else:
      raise InvalidRequestError(field, "not a delta of one of this block's projections or "
                                "small leaves")
    expected["on"] = ((), np.dtype(np.int32))
    spec = bank.deltas[name]
    if array not in expected or (spec.dtype, tuple(spec.shape)) != (
        expected[array][1].name, expected[array][0]):
      want = expected.get(array)
      raise InvalidRequestError(field, f"expected {want[1].name} {list(want[0])}" if want else
                                f"expected one of {', '.join(sorted(expected))}")
    shape, dtype = expected[array]
    out.setdefault(entry, {}).setdefault(key, {})[array] = np.zeros(shape, dtype)
    need += bank.slots * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if need > limits.max_lora_bank_bytes:
    raise InvalidRequestError("lora_bank", f"the delta bank needs {need} bytes, over this "
                              f"worker's {limits.max_lora_bank_bytes}")
  return out


def lora_cols(request, held: dict | None) -> np.ndarray | None:
  """RunBlockRequest.inputs['lora_cols'] (None when absent): bank columns of a banked block."""
  if "lora_cols" not in request.inputs:
    return None
  if not held:
    raise InvalidRequestError("inputs['lora_cols']", "this block holds no adapter bank")
  cols = _tensor(request, "lora_cols")
  entry = _lora_entry(held)
  if entry is None:
    raise InvalidRequestError("inputs['lora_cols']", "this block's bank holds no LoRA factors")
  slots, rank = entry["a"].shape[:2]
  total = slots * rank
  if cols.dtype != np.int32 or cols.ndim != 1 or not 1 <= cols.shape[0] <= total:
    raise InvalidRequestError("inputs['lora_cols']", f"int32 [1..{total}] expected, got "
                              f"{cols.dtype.name} {list(cols.shape)}")
  _columns_in("inputs['lora_cols']", cols, -1, total - 1)
  return cols


def _columns_in(field: str, values: np.ndarray, low: int, high: int) -> None:
  if values.min() < low or values.max() > high:
    i = int(np.argmax((values < low) | (values > high)))
    raise InvalidRequestError(field, f"entry {i}: {int(values[i])} is outside [{low}, {high}]")
