"""Workers: processes that host block instances and run them for a coordinator over gRPC.

The coordinator's scheduler plans every block; a block placed on a worker is a
`RemoteBlockInstance` there, run by that worker's executor thread (so different workers compute
at the same time) with one RunBlock RPC per batch. The worker keeps the params and the KV page
pool (donated in place, as in process); the coordinator keeps the page leases and sends each
batch's page tables in its packed step metadata. Hidden states between blocks on different
workers travel through the coordinator.
"""

import concurrent.futures
import threading
import time
from typing import Any, Sequence

import grpc
import jax
import numpy as np

from jblock.blocks import HEAD, LAYERS, Block
from jblock.errors import JBlockError, UnavailableError
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.engine import _load_on_devices
from jblock.runtime.executor import run_local_segment, stage_input
from jblock.runtime.instance import LocalBlockInstance, instance_stats
from jblock.runtime.kv import PagePool
from jblock.runtime.segments import Segment
from jblock.runtime.step import BlockBatch
from jblock.serving.coordinator import status_code
from jblock.serving.proto import jblock_pb2 as pb
from jblock.serving.proto import jblock_pb2_grpc as pb_grpc
from jblock.serving.tensor_codec import from_tensor_map, to_tensor_map

RPC_TIMEOUT_S = 600.0  # a RunBlock may include a first compile


def _abort(context, error: Exception):
  context.abort(status_code(error), str(error))


class WorkerServicer(pb_grpc.WorkerServicer):
  """A worker's side: hosts blocks from its zoo on its own mesh and runs batches of them."""

  def __init__(self, zoo_dir: str, mesh_shape: Sequence[int] | None = None):
    from jblock.zoo.store import Zoo
    self.zoo = Zoo(zoo_dir)
    self.mesh = mesh_lib.make_mesh(mesh_shape)
    self._instances: dict[str, LocalBlockInstance] = {}
    self._lock = threading.Lock()

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
      with self._lock:
        inst = self._instances.get(request.block_id)
        if inst is None:
          block = _load_on_devices(self.zoo, request.block_id, self.mesh)
          table = self._table_for(block) if block.kind == HEAD and block.config["tied_to"] else None
          pages = request.kv_pages or request.kv_slots * -(-request.max_len // 16)
          inst = LocalBlockInstance(request.block_id, block, request.block_id, self.mesh,
                                    request.batch_size, num_pages=pages if block.kind == LAYERS else 0,
                                    page_size=request.page_size or 16,
                                    max_leases=request.kv_slots, shared_table=table)
          self._instances[request.block_id] = inst
      return pb.HostBlockResponse(resident_bytes=inst.resident_bytes, placement=inst.placement)
    except JBlockError as e:
      _abort(context, e)

  def UnhostBlock(self, request, context):
    with self._lock:
      if self._instances.pop(request.block_id, None) is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"block {request.block_id} is not hosted here")
    return pb.UnhostBlockResponse()

  def RunBlock(self, request, context):
    inst = self._instances.get(request.block_id)
    if inst is None:
      context.abort(grpc.StatusCode.NOT_FOUND, f"block {request.block_id} is not hosted here")
    try:
      inputs = from_tensor_map(request.inputs)
      x, ints, floats = inputs["x"], inputs["ints"], inputs["floats"]
      if inst.kind != LAYERS and inst.kind != HEAD:
        x = np.asarray(x, np.int32)
      with self._lock:  # one batch at a time per worker swaps the KV buffers
        y = run_local_segment(Segment([inst], 0), x, ints, floats)
      inst.batches_run += 1
      response = pb.RunBlockResponse()
      to_tensor_map({"y": np.asarray(y)}, response.outputs)
      return response
    except KeyError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"RunBlock input {e} is missing")
    except JBlockError as e:
      _abort(context, e)

  def FreeSlots(self, request, context):
    # Slots are bookkept by the coordinator; a freed slot's stale keys are masked, never read.
    return pb.FreeSlotsResponse()

  def Register(self, request, context):
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "workers register with the coordinator")


class WorkerRegistry(pb_grpc.WorkerServicer):
  """The coordinator's side of Register: remembers workers until the engine places blocks."""

  def __init__(self):
    self.workers: dict[str, str] = {}  # worker id -> address
    self._cond = threading.Condition()

  def Register(self, request, context):
    if not request.address:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, "address: the worker's host:port is required")
    with self._cond:
      self.workers[request.worker_id or request.address] = request.address
      self._cond.notify_all()
    return pb.RegisterResponse()

  def wait_for(self, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    with self._cond:
      while len(self.workers) < count:
        left = deadline - time.monotonic()
        if left <= 0:
          raise UnavailableError(f"{len(self.workers)} of {count} workers registered within {timeout}s")
        self._cond.wait(min(left, 0.5))
      return [self.workers[k] for k in sorted(self.workers)][:count]


class RemoteBlockInstance:
  """A block hosted by a worker: the engine's view (page leases kept here, params there)."""

  def __init__(self, key: str, block: Block, block_id: str, batch_size: int, config,
               address: str, zoo_dir: str):
    self.key, self.block_id, self.kind, self.config = key, block_id, block.kind, block.config
    self.batch_size = batch_size
    self.models: set[str] = set()
    self.address = address
    self.executor_key = f"worker:{address}"  # one executor thread per worker
    self._channel = grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
    self._stub = pb_grpc.WorkerStub(self._channel)
    slots = config.kv_slots_for(block_id)
    pages = config.kv_pages_for(block_id) if self.kind == LAYERS else 0
    response = self._stub.HostBlock(pb.HostBlockRequest(
        block_id=block_id, zoo_dir=zoo_dir, batch_size=batch_size, kv_slots=slots,
        max_len=config.max_seq_len, kv_pages=pages, page_size=config.page_size),
        timeout=RPC_TIMEOUT_S)
    self.resident_bytes = response.resident_bytes
    self.placement = f"worker {address}: {response.placement}"
    self.pool = PagePool(pages, config.page_size, slots) if self.kind == LAYERS else None
    self.embed_table = None  # a remote tied head resolves its table on its worker
    self.batches_run = 0
    self.items_run = 0

  def run_batch(self, batch: BlockBatch):
    """One RunBlock RPC: the staged input and the packed metadata in, y (numpy) out."""
    x = stage_input(batch)
    ints, floats = batch.meta.pack()
    request = pb.RunBlockRequest(block_id=self.block_id)
    to_tensor_map({"x": np.asarray(x), "ints": ints, "floats": floats}, request.inputs)
    try:
      response = self._stub.RunBlock(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as e:
      raise UnavailableError(f"worker {self.address} failed block {self.block_id[:12]}: "
                             f"{e.code().name}: {e.details()}") from e
    return from_tensor_map(response.outputs)["y"]

  def close(self) -> None:
    try:
      self._stub.UnhostBlock(pb.UnhostBlockRequest(block_id=self.block_id), timeout=30.0)
    except grpc.RpcError:
      pass  # the worker is gone: nothing left to free there
    self._channel.close()

  def stats(self) -> dict[str, Any]:
    return instance_stats(self)


def plan_placement(chains: Sequence[Sequence[str]], workers: Sequence[str]) -> dict[str, str]:
  """Block id -> worker address: each chain cut into contiguous segments, one per worker.

  A block shared by several chains sits where its first chain put it (shared blocks are the
  bottom of variants' chains, so they land on the same worker for every chain).
  """
  placement: dict[str, str] = {}
  for chain in chains:
    for pos, block_id in enumerate(chain):
      placement.setdefault(block_id, workers[pos * len(workers) // len(chain)])
  return placement


def remote_factory(placement: dict[str, str], zoo_dir: str, config):
  """An engine InstanceFactory that hosts every block on its planned worker; a block of a model
  loaded later (Admin LoadModel) goes to the worker hosting the fewest blocks."""
  workers = sorted(set(placement.values()))

  def make(key: str, block: Block, block_id: str, batch_size: int, table) -> RemoteBlockInstance:
    if block_id not in placement:
      load = {w: 0 for w in workers}
      for w in placement.values():
        load[w] += 1
      placement[block_id] = min(workers, key=lambda w: (load[w], w))
    return RemoteBlockInstance(key, block, block_id, batch_size, config, placement[block_id],
                               zoo_dir)

  return make


def start_worker_server(zoo_dir: str, port: int = 0, host: str = "127.0.0.1",
                        mesh_shape: Sequence[int] | None = None) -> tuple[grpc.Server, int, WorkerServicer]:
  servicer = WorkerServicer(zoo_dir, mesh_shape)
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), options=[
      ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
  pb_grpc.add_WorkerServicer_to_server(servicer, server)
  bound = server.add_insecure_port(f"{host}:{port}")
  server.start()
  return server, bound, servicer


def register(coordinator: str, worker_id: str, address: str, timeout: float = 60.0) -> None:
  """Registers with the coordinator's registry, retrying until it is up (bounded)."""
  devices = [pb.Device(id=d.id, platform=d.platform, kind=d.device_kind) for d in jax.local_devices()]
  with grpc.insecure_channel(coordinator) as channel:
    stub = pb_grpc.WorkerStub(channel)
    stub.Register(pb.RegisterRequest(worker_id=worker_id, address=address, devices=devices),
                  timeout=timeout, wait_for_ready=True)
