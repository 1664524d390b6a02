"""Checks every field of the BlockHost RPCs a worker receives before it touches a device.

A worker runs only what its coordinator planned: blocks it was asked to host, with inputs of
the shape, dtype and range that block's compiled step takes. Each failure is an
InvalidRequestError naming the field (INVALID_ARGUMENT over gRPC), never a crash inside XLA.
"""

import dataclasses
import math

import grpc
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS
from jblock.errors import InvalidRequestError
from jblock.proto.tensor_codec import from_tensor
from jblock.runtime.step import _FLOAT_FIELDS, _INT_FIELDS

RUN_INPUTS = ("x", "ints", "floats")
HEAD_PREFIX = "head."  # the optional head inputs (jblock.runtime.head_rows), by name
# name -> (dtype, trailing dims: "T" the batch's tokens, "W" mask words, an int a bound)
_HEAD_INPUTS = {"logprobs": ("int32", ()), "targets": ("int32", ("T",)),
                "penalties": ("float32", (3,)), "history": ("int32", (1 << 21,)),
                "history_output": ("int32", ("history",)), "bias_ids": ("int32", (2048,)),
                "bias": ("float32", ("bias_ids",)), "min_p": ("float32", ()),
                "bitmask": ("int32", ("W",))}


@dataclasses.dataclass(frozen=True)
class HostLimits:
  max_batch_size: int = 1024  # rows of one compiled batch
  max_kv_slots: int = 65536  # concurrent requests through one block
  max_len: int = 1 << 20  # tokens of one request
  max_page_size: int = 4096  # tokens per KV page
  max_kv_bytes: int = 64 << 30  # one block's KV page pool
  max_lora_slots: int = 4096  # adapters resident at once in one block's bank
  max_lora_rank: int = 1024
  max_lora_bank_bytes: int = 16 << 30  # one block's adapter bank


@dataclasses.dataclass(frozen=True)
class Hosted:
  """What a hosted block accepts, fixed when it was hosted."""
  kind: str
  batch_size: int
  max_len: int
  num_pages: int
  page_size: int
  hidden_size: int
  vocab_size: int
  dtypes: frozenset  # dtype names of hidden states it takes (its params' dtypes)


def _range(field: str, value: int, low: int, high: int) -> None:
  if not low <= value <= high:
    raise InvalidRequestError(field, f"{value} is outside [{low}, {high}]")


def host_block(request, zoo, limits: HostLimits = HostLimits()) -> None:
  """A HostBlockRequest names a block of this worker's zoo and sizes a worker can hold."""
  if not zoo.has_block(request.block_id):
    raise InvalidRequestError("block_id", f"{request.block_id[:80]!r} is not a block of this "
                              f"worker's zoo")
  _range("batch_size", request.batch_size, 1, limits.max_batch_size)
  _range("kv_slots", request.kv_slots, 0, limits.max_kv_slots)
  _range("max_len", request.max_len, 1, limits.max_len)
  _range("page_size", request.page_size, 0, limits.max_page_size)  # 0: the default
  page_size = request.page_size or 16
  _range("kv_pages", request.kv_pages, 0,
         max(request.kv_slots, 1) * math.ceil(request.max_len / page_size))


def check_kv_bytes(block, num_pages: int, page_size: int,
                   limits: HostLimits = HostLimits()) -> None:
  """A layers block's KV pool of `num_pages` fits this worker's limit."""
  if block.kind != LAYERS:
    return
  import jax
  itemsize = max(np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(block.params))
  c = block.config
  need = 2 * c["num_layers"] * num_pages * c["num_kv_heads"] * page_size * c["head_dim"] * itemsize
  if need > limits.max_kv_bytes:
    raise InvalidRequestError("kv_pages", f"{num_pages} pages need {need} bytes of KV, over "
                              f"this worker's {limits.max_kv_bytes}")


def hosted(inst, request) -> Hosted:
  """The limits of an instance just hosted for `request`."""
  import jax
  pool = inst.pool
  return Hosted(kind=inst.kind, batch_size=inst.batch_size, max_len=request.max_len,
                num_pages=pool.num_pages if pool is not None else 0,
                page_size=pool.page_size if pool is not None else 0,
                hidden_size=int(inst.config.get("hidden_size", 0)),
                vocab_size=int(inst.config.get("vocab_size", 0)),
                dtypes=frozenset(np.dtype(a.dtype).name for a in jax.tree_util.tree_leaves(inst.params)))


def block_id(request, hosts: dict) -> Hosted:
  """The Hosted record of request.block_id; InvalidRequestError when it is not hosted here."""
  spec = hosts.get(request.block_id)
  if spec is None:
    raise InvalidRequestError("block_id", f"{request.block_id[:80]!r} is not hosted on this "
                              f"worker (its coordinator did not host it here)")
  return spec


def _tensor(request, name: str) -> np.ndarray:
  try:
    return from_tensor(request.inputs[name])
  except InvalidRequestError as e:
    raise InvalidRequestError(f"inputs[{name!r}]", str(e).split(": ", 1)[-1]) from None


def run_block(request, spec: Hosted, mailbox=None):
  """(x, ints, floats) of a RunBlockRequest, each checked against the hosted block.

  With `sources` (rows kept in this worker's mailbox, jblock.cluster.mailbox), x is instead a
  list of (array, index) per real row: mailbox rows, and the rows of inputs['x'] in order.
  """
  names = {n for n in request.inputs.keys()  # lora_cols(), head_inputs() check the others
           if n != "lora_cols" and not n.startswith(HEAD_PREFIX)}
  expected = set(RUN_INPUTS)
  if request.sources and "x" not in names:
    expected.discard("x")  # every row comes from the mailbox
  if names != expected:
    missing, extra = sorted(expected - names), sorted(names - expected)
    raise InvalidRequestError("inputs", f"expected exactly {sorted(expected)}; missing "
                              f"{missing}, unexpected {extra}")
  ints, floats = _tensor(request, "ints"), _tensor(request, "floats")
  x = _tensor(request, "x") if "x" in names else None
  if spec.kind == EMBED:
    if request.sources:
      raise InvalidRequestError("sources", "an embed block reads token ids from inputs['x'], "
                                "not hidden rows")
    if x.ndim != 2 or x.dtype != np.int32:
      raise InvalidRequestError("inputs['x']", f"token ids [rows, tokens] int32 expected, got "
                                f"{x.dtype.name} {list(x.shape)}")
    if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
      raise InvalidRequestError("inputs['x']", f"token ids must lie in [0, {spec.vocab_size})")
  elif x is not None:
    _hidden("inputs['x']", x, spec)
  if request.sources:
    if ints.ndim != 2:
      raise InvalidRequestError("inputs['ints']", f"int32 [rows, {len(_INT_FIELDS)} + pages] "
                                f"expected, got {list(ints.shape)}")
    rows = ints.shape[0]
    _range("inputs['ints'].shape[0] (rows)", rows, 1, spec.batch_size)
    refs, tokens = _sources(request, x, spec, rows, mailbox)
  else:
    rows, tokens = x.shape[0], x.shape[1]
    _range("inputs['x'].shape[0] (rows)", rows, 1, spec.batch_size)
  _range("inputs['x'].shape[1] (tokens)", tokens, 1, spec.max_len)
  n_tables = 1 if spec.kind == LAYERS else 0
  k = len(_INT_FIELDS)
  if ints.dtype != np.int32 or ints.ndim != 2 or ints.shape[0] != rows:
    raise InvalidRequestError("inputs['ints']", f"int32 [{rows}, {k} + pages] expected, got "
                              f"{ints.dtype.name} {list(ints.shape)}")
  width = ints.shape[1] - k
  max_width = math.ceil(spec.max_len / spec.page_size) + 1 if n_tables else 0
  if width < 0 or (n_tables and not 1 <= width <= max_width) or (not n_tables and width):
    raise InvalidRequestError("inputs['ints']", f"{ints.shape[1]} columns; this {spec.kind} "
                              f"block takes {k} + " + (f"1..{max_width} page-table entries"
                                                       if n_tables else "0 page-table entries"))
  if floats.dtype != np.float32 or list(floats.shape) != [rows, len(_FLOAT_FIELDS)]:
    raise InvalidRequestError("inputs['floats']", f"float32 [{rows}, {len(_FLOAT_FIELDS)}] "
                              f"expected, got {floats.dtype.name} {list(floats.shape)}")
  col = {name: ints[:, i] for i, name in enumerate(_INT_FIELDS)}
  _columns("starts", col["starts"], 0, spec.max_len)
  _columns("n_valid", col["n_valid"], 0, tokens)
  ends = col["starts"].astype(np.int64) + col["n_valid"]
  if ends.max() > spec.max_len:
    raise InvalidRequestError("inputs['ints'] (starts + n_valid)",
                              f"row {int(ends.argmax())} reaches token {int(ends.max())}, over "
                              f"max_len {spec.max_len}")
  bounds = {"top_k": (0, 1 << 30), "step": (0, spec.max_len), "adapter": (-1, 1 << 30),
            "rope_len": (0, spec.max_len)}  # seeds: any bit pattern
  for name, (low, high) in bounds.items():
    if name in col:
      _columns(name, col[name], low, high)
  if n_tables:
    pages = ints[:, k:]  # -1 - page: a read-only page (jblock.runtime.kv)
    if pages.min() < -spec.num_pages or pages.max() >= spec.num_pages:
      bad = pages[(pages < -spec.num_pages) | (pages >= spec.num_pages)][0]
      raise InvalidRequestError("inputs['ints'] (page table)", f"page {int(bad)} is outside "
                                f"this block's pool [0, {spec.num_pages}) (or its read-only "
                                f"encoding [-{spec.num_pages}, -1])")
  temperature, top_p = floats[:, 0], floats[:, 1]
  if not np.all(np.isfinite(floats)):
    raise InvalidRequestError("inputs['floats']", "temperature and top_p must be finite")
  if temperature.min() < 0:
    raise InvalidRequestError("inputs['floats'] (temperature)", "must be >= 0")
  if top_p.min() < 0 or top_p.max() > 1:
    raise InvalidRequestError("inputs['floats'] (top_p)", "must lie in [0, 1]")
  return (refs if request.sources else x), ints, floats


def _hidden(field: str, x, spec: Hosted, tokens: int | None = None) -> None:
  """x is [rows, tokens, hidden_size] hidden states of one of the block's dtypes."""
  if x.ndim != 3 or x.shape[2] != spec.hidden_size or (tokens is not None and x.shape[1] != tokens):
    raise InvalidRequestError(field, f"hidden states [rows, {tokens or 'tokens'}, "
                              f"{spec.hidden_size}] expected, got {list(x.shape)}")
  if np.dtype(x.dtype).name not in spec.dtypes:
    raise InvalidRequestError(field, f"dtype {np.dtype(x.dtype).name} is not the block's "
                              f"({', '.join(sorted(spec.dtypes))})")


def _sources(request, x, spec: Hosted, rows: int, mailbox) -> tuple[list, int]:
  """(array, index) per real row and the batch's tokens, from request.sources."""
  sources = request.sources
  if len(sources) > rows:
    raise InvalidRequestError("sources", f"{len(sources)} entries for a batch of {rows} rows")
  inline = sum(1 for s in sources if s.handle == 0)
  if (x.shape[0] if x is not None else 0) != inline:
    raise InvalidRequestError("inputs['x']", f"{0 if x is None else x.shape[0]} rows for the "
                              f"{inline} sources with handle 0")
  seen, named = set(), []
  for i, s in enumerate(sources):
    if s.handle:
      _range(f"sources[{i}].row", s.row, 0, HostLimits.max_batch_size - 1)
      if (s.handle, s.row) in seen:
        raise InvalidRequestError(f"sources[{i}]", f"handle {s.handle} row {s.row} is named twice")
      seen.add((s.handle, s.row))
      named.append((s.handle, s.row))
  if mailbox is None:
    raise InvalidRequestError("sources", "this worker keeps no mailbox")
  kept = iter(mailbox.lookup(named))
  refs, k = [], 0
  tokens = x.shape[1] if x is not None else None
  for i, s in enumerate(sources):
    if s.handle == 0:
      refs.append((x, k))
      k += 1
      continue
    array, index = next(kept)
    _hidden(f"sources[{i}]", array, spec, tokens)
    tokens = array.shape[1]
    refs.append((array, index))
  return refs, tokens


def _rows(field: str, rows) -> None:
  """Row numbers of one batch: at least one, each in range, none twice."""
  if not rows:
    raise InvalidRequestError(field, "at least one row is required")
  for i, row in enumerate(rows):
    _range(f"{field}[{i}]", row, 0, HostLimits.max_batch_size - 1)
  if len(set(rows)) != len(rows):
    raise InvalidRequestError(field, "a row is named twice")


def _block_ref(field: str, block_id: str) -> None:
  if not block_id or len(block_id) > 128:
    raise InvalidRequestError(field, f"{block_id[:80]!r} is not a block id")


def run_outputs(request, spec: Hosted, hosts: dict, rows: int) -> None:
  """A RunBlockRequest's output routing: where each output row goes (KEEP and PUSH need a
  next block of this block's width; KEEP's must be hosted here)."""
  from jblock.proto import jblock_pb2 as pb
  if not request.output_handle:
    if request.destinations or request.row_destinations:
      raise InvalidRequestError("output_handle", "destinations need a non-zero output_handle")
    return
  if spec.kind == HEAD:
    raise InvalidRequestError("output_handle", "a head block returns its tokens, not rows")
  dests = request.destinations
  if len(dests) > 64:
    raise InvalidRequestError("destinations", f"{len(dests)} entries; at most 64")
  if len(request.row_destinations) > rows:
    raise InvalidRequestError("row_destinations", f"{len(request.row_destinations)} entries for "
                              f"a batch of {rows} rows")
  for i, d in enumerate(request.row_destinations):
    if not -1 <= d < len(dests):
      raise InvalidRequestError(f"row_destinations[{i}]", f"{d} is outside [-1, {len(dests)})")
  kinds = pb.RowDestination.Kind
  for i, dest in enumerate(dests):
    if dest.kind not in kinds.values():
      raise InvalidRequestError(f"destinations[{i}].kind", f"{dest.kind} is not one of "
                                f"{list(kinds.keys())}")
    if dest.kind == kinds.Value("KEEP"):
      nxt = hosts.get(dest.block_id)
      if nxt is None or nxt.kind == EMBED or nxt.hidden_size != spec.hidden_size:
        raise InvalidRequestError(f"destinations[{i}].block_id", f"{dest.block_id[:80]!r} is not "
                                  f"a block hosted here that reads this block's rows")
    elif dest.kind == kinds.Value("PUSH"):
      _address(f"destinations[{i}].address", dest.address)
      _block_ref(f"destinations[{i}].block_id", dest.block_id)


def put_rows(request, hosts: dict) -> np.ndarray:
  """The rows of a PutRowsRequest, checked against the block hosted here that reads them."""
  if not request.handle:
    raise InvalidRequestError("handle", "must be non-zero")
  spec = hosts.get(request.block_id)
  if spec is None:
    raise InvalidRequestError("block_id", f"{request.block_id[:80]!r} is not hosted on this "
                              f"worker")
  if spec.kind == EMBED:
    raise InvalidRequestError("block_id", "an embed block reads token ids, not hidden rows")
  _rows("rows", list(request.rows))
  try:
    data = from_tensor(request.data)
  except InvalidRequestError as e:
    raise InvalidRequestError("data", str(e).split(": ", 1)[-1]) from None
  _hidden("data", data, spec)
  if data.shape[0] != len(request.rows):
    raise InvalidRequestError("data", f"{data.shape[0]} rows for {len(request.rows)} row numbers")
  _range("data.shape[1] (tokens)", data.shape[1], 1, spec.max_len)
  return data


def take_rows(request) -> None:
  if not request.handle:
    raise InvalidRequestError("handle", "must be non-zero")
  _rows("rows", list(request.rows))


def release_rows(request) -> None:
  if len(request.handles) > 65536:
    raise InvalidRequestError("handles", f"{len(request.handles)} entries; at most 65536")
  for i, handle in enumerate(request.handles):
    if not handle:
      raise InvalidRequestError(f"handles[{i}]", "must be non-zero")


def _columns(name: str, values: np.ndarray, low: int, high: int) -> None:
  if values.size and (values.min() < low or values.max() > high):
    row = int(np.argmax((values < low) | (values > high)))
    raise InvalidRequestError(f"inputs['ints'] ({name})", f"row {row}: {int(values[row])} is "
                              f"outside [{low}, {high}]")


def or_abort(context, check, request) -> None:
  """Runs `check(request)`; a bad field aborts the RPC with INVALID_ARGUMENT naming it."""
  try:
    check(request)
  except InvalidRequestError as e:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _address(field: str, address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or len(address) > 300:
    raise InvalidRequestError(field, f"{address[:80]!r} is not host:port")


def _devices(devices) -> None:
  for i, d in enumerate(devices):
    if d.memory_bytes < 0 or d.memory_limit_bytes < 0:
      raise InvalidRequestError(f"devices[{i}]", "memory bytes must be >= 0")
  if len(devices) > 4096:
    raise InvalidRequestError("devices", f"{len(devices)} devices; at most 4096")


def register(request) -> None:
  """A RegisterRequest: a worker id of sane length and the host:port it serves on."""
  if len(request.worker_id) > 128:
    raise InvalidRequestError("worker_id", "longer than 128 characters")
  _address("address", request.address)
  _devices(request.devices)
  if len(request.hosted_blocks) > 100_000:
    raise InvalidRequestError("hosted_blocks", f"{len(request.hosted_blocks)} entries")
  for i, block in enumerate(request.hosted_blocks):
    if len(block) > 128:
      raise InvalidRequestError(f"hosted_blocks[{i}]", "longer than 128 characters")


def heartbeat(request) -> None:
  """A HeartbeatRequest: counts and bytes are never negative."""
  _devices(request.devices)
  for name in ("blocks_hosted", "resident_bytes", "kv_bytes", "batches_run", "batches_running",
               "mailbox_rows", "mailbox_bytes", "blocks_loaded"):
    if getattr(request.load, name) < 0:
      raise InvalidRequestError(f"load.{name}", f"{getattr(request.load, name)} is negative")


def free_slots(request, spec: Hosted) -> None:
  for i, slot in enumerate(request.slots):
    if slot < 0:
      raise InvalidRequestError(f"slots[{i}]", f"{slot} is negative")


def head_inputs(request, spec: Hosted, rows: int, tokens: int) -> dict | None:
  """The optional head inputs of a RunBlockRequest (inputs named head.*), each checked for its
  dtype and shape [rows, ...]; None if there are none."""
  given = [n for n in request.inputs.keys() if n.startswith(HEAD_PREFIX)]
  if not given:
    return None
  if spec.kind != HEAD:
    raise InvalidRequestError("inputs", f"head inputs {sorted(given)} sent to a {spec.kind} block")
  out = {}
  for name in given:
    key = name[len(HEAD_PREFIX):]
    if key not in _HEAD_INPUTS:
      raise InvalidRequestError(f"inputs[{name!r}]", f"unknown; expected head.{{"
                                f"{', '.join(_HEAD_INPUTS)}}}")
    out[key] = _tensor(request, name)
  for key, array in out.items():
    dtype, dims = _HEAD_INPUTS[key]
    field = f"inputs['{HEAD_PREFIX}{key}']"
    if array.dtype != np.dtype(dtype) or array.ndim != 1 + len(dims) or array.shape[0] != rows:
      raise InvalidRequestError(field, f"{dtype} [{rows}{''.join(', ' + str(d) for d in dims)}] "
                                f"expected, got {array.dtype.name} {list(array.shape)}")
    for got, want in zip(array.shape[1:], dims):
      bound = {"T": tokens, "W": math.ceil(spec.vocab_size / 32)}.get(want)
      if isinstance(want, str) and want in out:  # the same shape as that input
        if array.shape != out[want].shape:
          raise InvalidRequestError(field, f"shape {list(array.shape)} differs from {want}'s")
      elif bound is not None and got != bound:
        raise InvalidRequestError(field, f"{got} columns; {bound} expected")
      elif isinstance(want, int) and not 1 <= got <= want:
        raise InvalidRequestError(field, f"{got} columns; 1..{want} allowed")
  if ("history" in out) != ("penalties" in out) or ("bias" in out) != ("bias_ids" in out):
    raise InvalidRequestError("inputs", "head.penalties come with head.history, head.bias with "
                              "head.bias_ids")
  if "history" in out and "history_output" not in out:
    raise InvalidRequestError("inputs", "head.history comes with head.history_output")
  for key in ("bias_ids", "history", "targets"):
    if key in out and out[key].size and (out[key].min() < -1 or out[key].max() >= spec.vocab_size):
      raise InvalidRequestError(f"inputs['{HEAD_PREFIX}{key}']", f"token ids must lie in "
                                f"[-1, {spec.vocab_size})")
  for key in ("penalties", "bias", "min_p"):
    if key in out and np.isnan(out[key]).any():
      raise InvalidRequestError(f"inputs['{HEAD_PREFIX}{key}']", "must not be NaN")
  return out
