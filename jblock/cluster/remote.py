"""The coordinator's side of workers: blocks hosted by worker processes, seen by the engine.

The coordinator's scheduler plans every block; a block placed on a worker is a
`RemoteBlockInstance` here, run by that worker's executor thread (so different workers compute
at the same time) with one RunBlock RPC per batch. The worker keeps the params and the KV page
pool (donated in place, as in process); the coordinator keeps the page leases and sends each
batch's page tables in its packed step metadata. `Placer` decides which worker hosts a block.

Hidden states between blocks on workers stay with the workers (jblock.cluster.mailbox,
jblock.cluster.rows): the coordinator sees tokens, step metadata, acknowledgements and the
sampled tokens.

A worker that dies (an RPC to it fails, or its heartbeats stop: jblock.cluster.membership) loses
its blocks: each `RemoteBlockInstance` there is re-hosted on a live worker (`recover`), keeping
its page leases, and the engine replays the affected requests' KV into it (jblock.runtime.replay).
The worker process's side is jblock.serving.worker.
"""

import threading
from typing import Any, Sequence

import grpc
import numpy as np

from jblock.blocks import LAYERS, Block
from jblock.cluster import rows as rows_lib
from jblock.cluster.links import ClusterLinks
from jblock.cluster.validate import HEAD_PREFIX
from jblock.errors import InstanceLostError, StaleBatchError, UnavailableError
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.proto.tensor_codec import from_tensor_map, to_tensor_map
from jblock.runtime import replicas as replicas_lib
from jblock.runtime.instance import InstanceBase, instance_stats
from jblock.runtime.kv import PagePool
from jblock.runtime.step import BlockBatch


class Placer:
  """Where blocks live: the initial plan (jblock.cluster.placement), then the live worker
  hosting the fewest blocks for a block loaded later or re-placed after its worker died."""

  def __init__(self, membership, plan: dict[str, str], links: ClusterLinks | None = None):
    self.membership = membership  # jblock.cluster.membership.Membership
    self.plan = dict(plan)  # block id (a replica: its key, <block id>#n) -> worker address
    self.links = links or ClusterLinks()  # credentials and per-RPC deadlines
    self.rows = rows_lib.RowLedger(self.links)  # hidden rows left on workers, traffic counters

  def candidates(self, block_id: str, exclude: Sequence[str] = ()) -> list[str]:
    """Live workers for `block_id` (or a replica's key), best first: its planned one, then the
    least loaded; never one holding another copy of the block (a worker hosts a block once)."""
    others = {w for k, w in self.plan.items()
              if k != block_id and replicas_lib.block_of(k) == replicas_lib.block_of(block_id)}
    alive = [w for w in self.membership.alive() if w not in exclude and w not in others]
    load = {w: 0 for w in alive}
    for w in self.plan.values():
      if w in load:
        load[w] += 1
    planned = self.plan.get(block_id)
    return sorted(alive, key=lambda w: (w != planned, load[w], w))

  def placed(self, block_id: str, address: str) -> None:
    self.plan[block_id] = address

  def failed(self, address: str, reason: str) -> None:
    """An RPC to `address` failed as a dead worker's would: it is declared dead."""
    self.membership.mark_dead(address, reason)


def _lost(code: grpc.StatusCode) -> bool:
  """The worker is gone (crashed, killed, unreachable) or its channel was closed on its death."""
  return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class RemoteBlockInstance(InstanceBase):
  """A block hosted by a worker: the engine's view (page leases kept here, params there)."""

  remote = True

  def __init__(self, key: str, block: Block, block_id: str, batch_size: int, config,
               placer: Placer, zoo_dir: str):
    self.key, self.block_id, self.kind, self.config = key, block_id, block.kind, block.config
    # The placer's entry: a replica's own key (<block id>#n), else the block id.
    self._plan_key = key if replicas_lib.block_of(key) == block_id else block_id
    self.batch_size = batch_size
    self.models: set[str] = set()
    self._placer = placer
    slots = config.kv_slots_for(block_id)
    pages = config.kv_pages_for(block_id) if self.kind == LAYERS else 0
    self._host_request = pb.HostBlockRequest(
        block_id=block_id, zoo_dir=zoo_dir, batch_size=batch_size, kv_slots=slots,
        max_len=config.max_seq_len, kv_pages=pages, page_size=config.page_size)
    self.pool = PagePool(pages, config.page_size, slots) if self.kind == LAYERS else None
    self.embed_table = None  # a remote tied head resolves its table on its worker
    self.batches_run = 0
    self.items_run = 0
    self.available = True  # False while its worker is lost and it is being re-placed
    self.lost_reason = ""  # set when it could not be re-placed anywhere
    self.moves: list[str] = []  # why it left each earlier worker
    self.address = ""
    self._channel = None
    self.lora_bank = None  # banked targets -> None: the bank itself lives on the worker
    self.lora_bank_bytes = 0
    self._slots: dict[int, dict] = {}  # adapter bank slot -> factors installed there
    self._lora_lock = threading.Lock()  # installs vs re-hosting
    self._host_somewhere()

  def _host_somewhere(self, exclude: Sequence[str] = ()) -> None:
    """Hosts the block on the first candidate worker that takes it; UnavailableError naming
    every refusal when none does."""
    refusals = []
    for address in self._placer.candidates(self._plan_key, exclude):
      channel = self._placer.links.channel(address)
      stub = pb_grpc.BlockHostStub(channel)
      try:
        response = stub.HostBlock(self._host_request, timeout=self._placer.links.deadlines.host_s)
      except grpc.RpcError as e:
        channel.close()
        refusals.append(f"{address}: {e.code().name}: {e.details()}")
        if _lost(e.code()):
          self._placer.failed(address, f"HostBlock failed: {e.code().name}")
        continue
      self._channel, self._stub, self.address = channel, stub, address
      self.executor_key = f"worker:{address}"  # one executor thread per worker
      self.resident_bytes = response.resident_bytes
      self.lora_bank_bytes = response.lora_bank_bytes
      self.placement = f"worker {address}: {response.placement}"
      self._placer.placed(self._plan_key, address)
      return
    raise UnavailableError(f"block {self.block_id[:12]} ({self.kind}) could not be placed on any "
                           f"worker: " + ("; ".join(refusals) or "no live worker"))

  def recover(self, reason: str, to: str | None = None) -> None:
    """Re-hosts the block on another live worker (`to` first, if given): after its worker was
    lost, or to move it. The new copy has a fresh, empty KV pool; the page leases stay here, so
    callers replay what the requests had cached. A live old worker then unhosts it (params and
    KV freed there); if no other worker takes it, it stays where it is."""
    old, old_channel, old_stub = self.address, self._channel, self._stub
    old_alive = old_channel is not None and self._placer.membership.is_alive(old)
    if old_channel is not None and not old_alive:
      old_channel.close()  # fails whatever was still waiting on the dead worker at once
      self._channel = None
    if to is not None:
      self._placer.placed(self._plan_key, to)
    try:
      self._host_somewhere(exclude=[old])
    except UnavailableError as e:
      if old_alive:  # a move that found no taker: the old copy serves on
        self._placer.placed(self._plan_key, old)
        self.moves.append(f"stayed on {old}: {e}")
        return
      self.moves.append(f"{old}: {reason}")
      self.lost_reason = f"its worker {old} was lost ({reason}) and {e}"
      self.placement = f"lost: {self.lost_reason}"
      raise UnavailableError(self.lost_reason) from None
    self.moves.append(f"{old}: {reason}")
    with self._lora_lock:
      self._reinstall_adapters()  # before the callers replay through the new copy
    if old_alive:
      try:
        old_stub.UnhostBlock(pb.UnhostBlockRequest(block_id=self.block_id), timeout=30.0)
      except grpc.RpcError:
        pass  # gone meanwhile: nothing left to free there
      old_channel.close()

  def run_batch(self, batch: BlockBatch):
    """One RunBlock RPC: the input rows (by value, or by mailbox reference) and the packed
    metadata in; out, the sampled tokens (numpy) at a head, else a rows_lib.RemoteRows."""
    address, stub = self.address, self._stub  # read before the epochs (see below)
    if any(it.epoch != it.req.epoch for it in batch.items):
      # Built before its requests paused for a lost worker, and now bound for the block's new
      # worker: its writes would land in the KV being replayed there.
      raise StaleBatchError(f"batch for block {self.block_id[:12]} outlived its worker")
    ledger = self._placer.rows
    x, sources, by_reference = rows_lib.stage(batch, address)
    ints, floats = batch.meta.pack()
    request = pb.RunBlockRequest(block_id=self.block_id, sources=sources)
    to_tensor_map({"ints": ints, "floats": floats, **({"x": x} if x is not None else {})},
                  request.inputs)
    if batch.meta.lora_cols is not None:  # the adapter bank columns this batch's rows use
      to_tensor_map({"lora_cols": batch.meta.lora_cols}, request.inputs)
    if batch.meta.head is not None:  # logprobs, penalties, bias, masks (jblock.runtime.head_rows)
      to_tensor_map({HEAD_PREFIX + k: v for k, v in batch.meta.head.items()}, request.inputs)
    if not batch.segment.ends_at_head and ledger.worker_to_worker:
      rows_lib.route(request, batch, address, ledger.new_handle())
    sent = 0 if x is None else x.nbytes
    ledger.count(address, meta_bytes_sent=ints.nbytes + floats.nbytes,
                 rows_by_reference=len(by_reference),
                 **({"token_bytes_sent": sent} if batch.segment.starts_at_embed else
                    {"hidden_bytes_sent": sent, "rows_sent": len(batch.items) - len(by_reference)}))
    links = self._placer.links
    timeout = links.run_deadline(address, self.block_id, batch.b_pad, batch.t_pad)
    try:
      response = stub.RunBlock(request, timeout=timeout)
      links.ran(address, self.block_id, batch.b_pad, batch.t_pad)
    except grpc.RpcError as e:
      rows_lib.unread(by_reference, address)
      message = (f"worker {address} failed block {self.block_id[:12]}: "
                 f"{links.explain(e, timeout)}")
      if _lost(e.code()):
        self._placer.failed(address, f"RunBlock failed: {e.code().name}")
        raise InstanceLostError(f"worker:{address}", message) from e
      raise UnavailableError(message) from e
    if request.output_handle:
      return rows_lib.received(ledger, request, response, address)
    outputs = from_tensor_map(response.outputs)
    ledger.count(address, token_bytes_received=sum(a.nbytes for a in outputs.values()))
    y = outputs.pop("y")
    return {"tokens": y, **outputs} if outputs else y

  def ensure_lora_bank(self, slots: int, max_rank: int, targets) -> None:
    """Its worker holds an adapter bank covering `targets` (HostBlock again: the bank grows;
    a re-hosted copy gets the same bank)."""
    with self._lora_lock:
      bank = self._host_request.lora_bank
      have = set(bank.targets)
      if set(targets) <= have and self._host_request.HasField("lora_bank"):
        return
      bank.slots, bank.max_rank = slots, max_rank
      del bank.targets[:]
      bank.targets.extend(sorted(have | set(targets)))
      self._grow_bank()

  def ensure_delta_bank(self, slots: int, factors: dict[str, dict[str, Any]]) -> None:
    """Its worker's bank has the arrays of these compressed-delta factors (one slot's:
    entry -> key -> array), declared by dtype and shape in HostBlockRequest.lora_bank.deltas."""
    with self._lora_lock:
      bank = self._host_request.lora_bank
      new = {f"{entry}/{key}/{name}": np.asarray(v) for entry, parts in factors.items()
             for key, part in parts.items() for name, v in part.items()}
      if set(new) <= set(bank.deltas.keys()) and self._host_request.HasField("lora_bank"):
        return
      bank.slots = slots
      for name, v in new.items():
        bank.deltas[name].CopyFrom(pb.Tensor(dtype=v.dtype.name, shape=list(v.shape)))
      self._grow_bank()

  def _grow_bank(self) -> None:
    """HostBlock again with the request's bank (under self._lora_lock); records the bank's
    structure: LoRA targets -> None, compressed entries -> {key: None}."""
    bank = self._host_request.lora_bank
    view: dict[str, Any] = {t: None for t in bank.targets}
    for name in bank.deltas.keys():
      entry, key = name.rpartition("/")[0].rpartition("/")[::2]
      if view.get(entry) is None and entry not in bank.targets:
        view[entry] = {}
      if isinstance(view[entry], dict):
        view[entry][key] = None
    self.lora_bank = view
    if self._channel is None:
      return  # lost: re-hosting brings the bank
    try:
      response = self._stub.HostBlock(self._host_request,
                                      timeout=self._placer.links.deadlines.host_s)
    except grpc.RpcError as e:
      raise UnavailableError(f"worker {self.address} refused the adapter bank of block "
                             f"{self.block_id[:12]}: {e.code().name}: {e.details()}") from e
    self.lora_bank_bytes = response.lora_bank_bytes

  def install_adapter(self, slot: int, factors: dict[str, dict[str, np.ndarray]]) -> None:
    """Slot `slot` of the worker's bank := factors (target -> a [R, in], b [R, out]); {} clears
    it. Remembered, so a re-hosted copy gets it again. A worker that fails the install is
    treated as lost (its requests replay elsewhere, with the slot installed there)."""
    with self._lora_lock:
      if factors:
        self._slots[slot] = factors
      else:
        self._slots.pop(slot, None)
      if self._channel is None:
        return  # lost: re-hosting installs it
      try:
        self._install(slot, factors)
      except grpc.RpcError as e:
        self._placer.failed(self.address, f"InstallAdapter failed: {e.code().name}: "
                            f"{e.details()}")

  def _install(self, slot: int, factors) -> None:
    request = pb.InstallAdapterRequest(block_id=self.block_id, slot=slot)
    flat = {}
    for target, parts in factors.items():
      for key, value in parts.items():
        if isinstance(value, dict):  # a compressed delta's arrays, or a small leaf's
          flat.update({f"{target}/{key}/{k}": np.asarray(v) for k, v in value.items()})
        else:  # a LoRA factor
          flat[f"{target}/{key}"] = value
    to_tensor_map(flat, request.factors)
    self._stub.InstallAdapter(request, timeout=self._placer.links.deadlines.host_s)

  def _reinstall_adapters(self) -> None:
    """The adapters resident here, installed again in a freshly hosted copy."""
    for slot, factors in sorted(self._slots.items()):
      try:
        self._install(slot, factors)
      except grpc.RpcError as e:
        raise UnavailableError(f"worker {self.address} could not take back adapter slot {slot} "
                               f"of block {self.block_id[:12]}: {e.code().name}") from e

  def close(self) -> None:
    self._placer.plan.pop(self._plan_key, None)
    if self._channel is None:
      return  # lost with its worker: nothing left to free
    try:
      self._stub.UnhostBlock(pb.UnhostBlockRequest(block_id=self.block_id),
                             timeout=self._placer.links.deadlines.unhost_s)
    except grpc.RpcError:
      pass  # the worker is gone: nothing left to free there
    self._channel.close()

  def stats(self) -> dict[str, Any]:
    out = instance_stats(self)
    out.update(worker=self.address, available=self.available, moves=list(self.moves))
    return out


def remote_factory(placer: Placer, zoo_dir: str, config):
  """An engine InstanceFactory that hosts every block on its planned worker; a block of a model
  loaded later (Admin LoadModel) goes to the live worker hosting the fewest blocks, late
  joiners included."""

  def make(key: str, block: Block, block_id: str, batch_size: int, table) -> RemoteBlockInstance:
    return RemoteBlockInstance(key, block, block_id, batch_size, config, placer, zoo_dir)

  return make
