"""Workers: processes that host block instances and run them for a coordinator over gRPC.

A worker hosts blocks from its zoo on its own mesh (HostBlock) and runs a batch of one per
RunBlock call: it keeps the params and the KV page pool (donated in place, as in process); the
coordinator keeps the page leases and sends each batch's page tables in its packed step
metadata. The coordinator's side (which worker hosts a block, the engine's view of a block
hosted here, re-hosting after a worker dies) is jblock.cluster.remote.

Hidden states between blocks on workers stay with the workers: a batch's output rows are kept
in the worker's mailbox when its next block is hosted there too, pushed to the next block's
worker otherwise (PutRows, with the cluster's credentials), and returned only when a block of the
coordinator's own runs next (jblock.cluster.mailbox, jblock.cluster.rows).
"""

import concurrent.futures
import threading
import time
from typing import Any, Sequence

import grpc
import jax
import numpy as np

from jblock.blocks import HEAD, LAYERS, Block
from jblock.cluster import rows as rows_lib
from jblock.cluster import security, validate, validate_banks
from jblock.cluster.links import ClusterLinks
from jblock.cluster.mailbox import Mailbox
from jblock.errors import InvalidRequestError, JBlockError
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.proto.tensor_codec import to_tensor, to_tensor_map
from jblock.runtime import delta_bank
from jblock.runtime import lora as lora_lib
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.executor import gather_rows, run_local_segment
from jblock.runtime.instance import LocalBlockInstance
from jblock.runtime.segments import Segment
from jblock.serving.coordinator import status_code
from jblock.zoo.loading import load_on_devices


def _abort(context, error: Exception):
  context.abort(status_code(error), str(error))


class BlockHostServicer(pb_grpc.BlockHostServicer):
  """A worker's side: hosts blocks from its zoo on its own mesh and runs batches of them."""

  def __init__(self, zoo_dir: str, mesh_shape: Sequence[int] | None = None,
               credentials: security.ClusterCredentials | None = None,
               mailbox_bytes: int = 1 << 30, push_deadline_s: float = 5.0,
               push_delay_s: float = 0.0):
    from jblock.zoo.store import Zoo
    self.zoo = Zoo(zoo_dir)
    self.mesh = mesh_lib.make_mesh(mesh_shape)
    self._instances: dict[str, LocalBlockInstance] = {}
    self._hosted: dict[str, validate.Hosted] = {}  # what each hosted block accepts
    self._lock = threading.Lock()
    self._batches_run = 0
    self._blocks_loaded = 0  # HostBlock calls that read the zoo (a block hosted again is not)
    self._running = 0  # RunBlock calls in progress
    self.mailbox = Mailbox(mailbox_bytes)  # rows for the batches this worker runs next
    self._peers = ClusterLinks(credentials)  # worker -> worker channels
    self._peer_stubs: dict[str, Any] = {}
    self._lock_peers = threading.Lock()
    self.push_deadline_s = push_deadline_s  # a slower peer: its rows go back to the coordinator
    self.push_delay_s = push_delay_s  # benchmarks: a sleep before each PutRows (a slower link)

  def load(self) -> pb.WorkerLoad:
    """What this worker holds and does, for its heartbeats."""
    instances = list(self._instances.values())
    mailbox = self.mailbox.stats()
    return pb.WorkerLoad(blocks_hosted=len(instances),
                         resident_bytes=sum(i.resident_bytes for i in instances),
                         kv_bytes=sum(i.kv_bytes for i in instances),
                         batches_run=self._batches_run, batches_running=self._running,
                         mailbox_rows=mailbox["rows"], mailbox_bytes=mailbox["bytes"],
                         blocks_loaded=self._blocks_loaded)

  def hosted_blocks(self) -> list[str]:
    """The blocks hosted here, sent when registering again with a restarted coordinator."""
    with self._lock:
      return sorted(self._instances)

  def forget_coordinator(self) -> None:
    """Before joining a new coordinator: rows kept for the old one's batches are dropped (the
    new one numbers its handles afresh); blocks, their KV pools and banks stay. The KV pages'
    contents are stale but never read: the new coordinator leases pages afresh and a request
    reads only the positions it wrote."""
    self.mailbox.clear()

  def _table_for(self, head: Block):
    """A tied head needs its embedding table: the hosted embed's buffer, or loaded for it."""
    embed_id = head.config["tied_to"]
    if embed_id in self._instances:
      return self._instances[embed_id].embed_table
    embed = self.zoo.load_block(embed_id)
    shardings = mesh_lib.param_shardings(embed.params, self.mesh)
    return jax.device_put(embed.params["embedding"], shardings["embedding"])

  def HostBlock(self, request, context):
    try:
      validate.host_block(request, self.zoo)
      with self._lock:
        inst = self._instances.get(request.block_id)
        if inst is not None and not self._same_sizes(request):
          # Hosted for an earlier coordinator with other sizes: host it afresh.
          del self._instances[request.block_id], self._hosted[request.block_id]
          inst = None
        if inst is None:
          block = load_on_devices(self.zoo, request.block_id,
                                  lambda shapes: mesh_lib.param_shardings(shapes, self.mesh))
          table = self._table_for(block) if block.kind == HEAD and block.config["tied_to"] else None
          pages = request.kv_pages or request.kv_slots * -(-request.max_len // 16)
          validate.check_kv_bytes(block, pages, request.page_size or 16)
          inst = LocalBlockInstance(request.block_id, block, request.block_id, self.mesh,
                                    request.batch_size, num_pages=pages if block.kind == LAYERS else 0,
                                    page_size=request.page_size or 16,
                                    max_leases=request.kv_slots, shared_table=table)
          self._instances[request.block_id] = inst
          self._hosted[request.block_id] = validate.hosted(inst, request)
          self._blocks_loaded += 1
        if request.HasField("lora_bank"):
          self._host_bank(inst, request.lora_bank)
      return pb.HostBlockResponse(resident_bytes=inst.resident_bytes, placement=inst.placement,
                                  lora_bank_bytes=inst.lora_bank_bytes)
    except JBlockError as e:
      _abort(context, e)

  def _same_sizes(self, request) -> bool:
    """Whether the hosted copy of request.block_id has the batch, length and KV pool asked."""
    held = self._hosted[request.block_id]
    if held.batch_size != request.batch_size or held.max_len != request.max_len:
      return False
    pages = request.kv_pages or request.kv_slots * -(-request.max_len // 16)
    return held.kind != LAYERS or (held.num_pages, held.page_size) == (pages, request.page_size or 16)

  def _host_bank(self, inst, bank) -> None:
    """Builds or grows an instance's adapter bank: LoRA targets (layers blocks) and
    compressed-delta arrays (any block kind) (under self._lock)."""
    if inst.kind != LAYERS and (bank.targets or bank.max_rank):
      raise InvalidRequestError("lora_bank.targets", f"a {inst.kind} block holds no LoRA targets")
    targets = validate_banks.lora_bank(bank, lora_lib.projections(inst.params),
                                       np.dtype(inst.dtype).itemsize)
    layout = validate_banks.delta_layout(bank, inst.params) if bank.deltas else {}
    if inst.lora_bank:
      validate_banks.bank_matches(bank, inst.lora_bank)
    if targets:
      lora_lib.ensure_bank(inst, targets, bank.slots, bank.max_rank)
    if layout:
      delta_bank.ensure_delta_bank(inst, layout, bank.slots)

  def InstallAdapter(self, request, context):
    try:
      validate.block_id(request, self._hosted)
      inst = self._instances.get(request.block_id)
      factors = validate_banks.install_adapter(request, inst.lora_bank if inst is not None else None)
      with self._lock:  # between batches (RunBlock reads the bank under this lock)
        lora_lib.write_slot(inst, request.slot, factors, in_place=True)
      return pb.InstallAdapterResponse()
    except JBlockError as e:
      _abort(context, e)

  def UnhostBlock(self, request, context):
    with self._lock:
      self._hosted.pop(request.block_id, None)
      if self._instances.pop(request.block_id, None) is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"block {request.block_id} is not hosted here")
    return pb.UnhostBlockResponse()

  def RunBlock(self, request, context):
    try:
      spec = validate.block_id(request, self._hosted)
      x, ints, floats = validate.run_block(request, spec, self.mailbox)
      validate.run_outputs(request, spec, self._hosted, ints.shape[0])
      inst = self._instances[request.block_id]
      lora_cols = validate_banks.lora_cols(request, inst.lora_bank)
      read = [(s.handle, s.row) for s in request.sources if s.handle]
      self._running += 1
      try:
        if request.sources:  # rows from the mailbox (and x): one [rows, T, D] batch on device
          x = gather_rows(x, ints.shape[0])
        head = validate.head_inputs(request, spec, ints.shape[0], x.shape[1])
        with self._lock:  # one batch at a time per worker swaps the KV buffers
          y = run_local_segment(Segment([inst], 0), x, ints, floats, lora_cols, head)
          if not request.output_handle:
            y = jax.device_get(y)
      finally:
        self._running -= 1
        self.mailbox.consume(read)
      inst.batches_run += 1
      self._batches_run += 1
      response = pb.RunBlockResponse()
      if request.output_handle:
        self._route_rows(request, y, response)
      else:
        # At a head: the tokens as y, and the logprobs (a dict) under their names.
        outputs = {"y": y["tokens"], **y} if isinstance(y, dict) else {"y": y}
        to_tensor_map({k: np.asarray(v) for k, v in outputs.items() if k != "tokens"},
                      response.outputs)
      return response
    except KeyError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"RunBlock input {e} is missing")
    except JBlockError as e:
      _abort(context, e)

  def FreeSlots(self, request, context):
    # Slots are bookkept by the coordinator; a freed slot's stale keys are masked, never read.
    return pb.FreeSlotsResponse()

  # ---- hidden rows between workers (jblock.cluster.mailbox) ------------------------------------

  def _route_rows(self, request, y, response) -> None:
    """Keeps, pushes or returns each output row as request.destinations say. Rows that cannot be
    kept (mailbox full) or pushed (the peer failed or is slow) come back in the response."""
    groups: dict[int, list[int]] = {}
    for row, d in enumerate(request.row_destinations):
      if d >= 0:
        groups.setdefault(d, []).append(row)
    host_y, returned = None, []
    for d, rows in groups.items():
      dest = request.destinations[d]
      if dest.kind == rows_lib.KEEP:
        if self.mailbox.put(request.output_handle, rows, y, indices=rows):
          continue
        response.undelivered.append(f"rows {rows}: this worker's mailbox is full")
      elif dest.kind == rows_lib.PUSH:
        host_y = np.asarray(y) if host_y is None else host_y
        data = host_y[rows]
        error = self._push(dest, request.output_handle, rows, data)
        if error is None:
          response.rows_pushed += len(rows)
          response.bytes_pushed += data.nbytes
          continue
        response.undelivered.append(f"rows {rows} to {dest.address}: {error}")
      returned += rows
    if returned:
      returned.sort()
      host_y = np.asarray(y) if host_y is None else host_y
      to_tensor_map({"y": host_y[returned]}, response.outputs)
      response.returned_rows.extend(returned)

  def _push(self, dest, handle: int, rows: list[int], data: np.ndarray) -> str | None:
    """PutRows to the worker of the next block; None when delivered, else why not."""
    if self.push_delay_s:
      time.sleep(self.push_delay_s)
    with self._lock_peers:
      stub = self._peer_stubs.get(dest.address)
      if stub is None:
        stub = pb_grpc.BlockHostStub(self._peers.channel(dest.address))
        self._peer_stubs[dest.address] = stub
    try:
      stub.PutRows(pb.PutRowsRequest(handle=handle, block_id=dest.block_id, rows=rows,
                                     data=to_tensor(data)), timeout=self.push_deadline_s)
    except grpc.RpcError as e:
      return f"{e.code().name}: {e.details()}"
    return None

  def PutRows(self, request, context):
    try:
      data = validate.put_rows(request, self._hosted)
    except JBlockError as e:
      _abort(context, e)
    if not self.mailbox.put(request.handle, list(request.rows), data):
      context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"mailbox full: {data.nbytes} more bytes would pass "
                    f"{self.mailbox.capacity_bytes}")
    return pb.PutRowsResponse()

  def TakeRows(self, request, context):
    try:
      validate.take_rows(request)
      refs = [(request.handle, row) for row in request.rows]
      found = self.mailbox.lookup(refs, field="rows")
    except JBlockError as e:
      _abort(context, e)
    data = np.stack([np.asarray(array[index]) for array, index in found])
    self.mailbox.consume(refs)
    return pb.TakeRowsResponse(data=to_tensor(data))

  def ReleaseRows(self, request, context):
    validate.or_abort(context, validate.release_rows, request)
    self.mailbox.release(request.handles)
    return pb.ReleaseRowsResponse()


def start_worker_server(zoo_dir: str, port: int = 0, host: str = "127.0.0.1",
                        mesh_shape: Sequence[int] | None = None,
                        credentials: security.ClusterCredentials | None = None,
                        **servicer_options) -> tuple[grpc.Server, int, BlockHostServicer]:
  """Serves BlockHost; only callers with the cluster's `credentials` get past the guard (and
  the worker presents them to its peers). `servicer_options`: BlockHostServicer's (mailbox
  size, push deadline and delay)."""
  servicer = BlockHostServicer(zoo_dir, mesh_shape, credentials, **servicer_options)
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), options=[
      ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
      interceptors=security.server_interceptors(credentials))
  pb_grpc.add_BlockHostServicer_to_server(servicer, server)
  bound = security.add_port(server, f"{host}:{port}", credentials)
  server.start()
  return server, bound, servicer
