"""A model whose blocks are too big for one host, on a mesh that spans processes.

Every process calls `initialize` (jax.distributed: process 0 hosts the coordination service; on
CPU the processes exchange collectives over gloo), then builds the same global mesh over every
process's devices (Auto axes, the engine's (data, model) layout and sharding rules), restores the
chain's params from the zoo straight onto the global NamedShardings (orbax: each process reads
and holds only the shards on its own devices) and runs the engine's segment functions
(jblock.runtime.segments) with the engine's block instances and KV page pools.

JAX's multi-controller model runs one program on every process: each jitted call must be issued
by all processes, in the same order, with the same inputs. `MeshChain.generate` is such a
program (a fixed batch of prompts, greedy or seeded sampling, decided before it starts); the
engine's serving loop, whose batches depend on arrival times, is not, and stays single-process.
"""

import dataclasses
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.models import blocks as block_fns
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.executor import run_local_segment
from jblock.runtime.instance import LocalBlockInstance
from jblock.runtime.kv import pages_for
from jblock.runtime.segments import Segment
from jblock.runtime.step import StepMeta
from jblock.zoo import blockio

_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str  # host:port of process 0's coordination service (it binds there)
  num_processes: int  # processes in the mesh
  process_id: int  # this process's rank, 0 .. num_processes - 1
  local_devices: int = 0  # CPU devices this process exposes; 0 = the platform's default
  timeout_s: int = 60  # how long start-up waits for every process to join
  # Address gloo's collective sockets bind and advertise; None = the coordinator's host when
  # that is a loopback address (a loopback mesh stays on loopback), else gloo's default (the
  # address this host's name resolves to).
  collectives_host: str | None = None

  def gloo_host(self) -> str | None:
    host = self.coordinator_address.rsplit(":", 1)[0].strip("[]")
    return self.collectives_host or (host if host in _LOOPBACK else None)

  def validate(self) -> None:
    """ValueError naming the field that is wrong."""
    if not _ADDRESS.match(self.coordinator_address or ""):
      raise ValueError(f"coordinator_address must be host:port, got {self.coordinator_address!r}")
    if self.num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
    if self.local_devices < 0:
      raise ValueError(f"local_devices must be >= 0, got {self.local_devices}")
    if self.timeout_s < 1:
      raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")


def initialize(config: DistributedConfig) -> None:
  """Joins the distributed runtime; call before anything touches a JAX device."""
  config.validate()
  if config.local_devices:
    jax.config.update("jax_num_cpu_devices", config.local_devices)
  # gloo is this JAX's default for CPU; set it so a changed default cannot silently drop
  # cross-process collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if config.gloo_host():
    _bind_gloo_to(config.gloo_host())
  jax.distributed.initialize(
      config.coordinator_address, num_processes=config.num_processes,
      process_id=config.process_id, initialization_timeout=config.timeout_s,
      # Bind exactly the address the others dial (127.0.0.1 stays loopback), not every interface.
      coordinator_bind_address=config.coordinator_address,
      heartbeat_timeout_seconds=max(10, config.timeout_s),
      shutdown_timeout_seconds=config.timeout_s)


def _bind_gloo_to(host: str) -> None:
  """Makes the CPU backend's gloo collectives bind `host`: JAX has no public option for it, so
  the CPU backend factory is replaced (before the backend exists) by one that passes it."""
  from jax._src import distributed, xla_bridge
  from jax._src.lib import _jax

  def cpu_client():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client, hostname=host)
    return xla_bridge.make_cpu_client(collectives=collectives)

  xla_bridge.register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)


def shutdown() -> None:
  jax.distributed.shutdown()


def global_mesh(mesh_shape: Sequence[int] | None = None):
  """The engine's (data, model) mesh over every process's devices; default: all on model."""
  return mesh_lib.make_mesh(mesh_shape, devices=jax.devices())


def replicated_input(x: np.ndarray, mesh) -> jax.Array:
  """A host array every process holds the same copy of, as one global replicated array."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, mesh_lib.replicated(mesh), lambda idx: x[idx])


def local_value(y: jax.Array) -> np.ndarray:
  """A replicated global array's value, read from this process's own copy."""
  return np.asarray(y.addressable_data(0))


def restore_block(zoo, block_id: str, mesh, verify: bool = True) -> Block:
  """A block's params restored from the zoo onto its global shardings on `mesh`.

  Each process reads only the shards on its devices. A block's id is a hash over all its bytes,
  which no single process holds: with `verify`, every process first reads the block whole on
  the host and checks the hash (one block's bytes in host memory at a time). Every process must
  do it, not only one, since an orbax restore is a collective step of all processes; they read
  the same files, so a corrupted block fails everywhere alike instead of hanging the others.
  """
  record = zoo.block_record(block_id)
  if verify:
    zoo.load_block(block_id)  # CorruptedBlockError on a bad hash; the host copy is dropped
  shapes = _shapes(record["leaves"])
  if not shapes:
    return Block(record["kind"], record["config"], {})
  shardings = mesh_lib.param_shardings(shapes, mesh)
  if record.get("parts"):  # assembled from stored parts (experts): read on the host, then placed
    return Block(record["kind"], record["config"],
                 blockio.place(zoo.load_block(block_id).params, shardings))
  args = blockio.restore_args(record["leaves"], shardings)
  params = blockio.restore(os.path.join(zoo.blocks_dir, block_id), args)
  return Block(record["kind"], record["config"], params)


def _shapes(leaves: dict[str, dict[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in leaves.items():
    node = out
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = jax.ShapeDtypeStruct(tuple(leaf["shape"]), jnp.dtype(leaf["dtype"]))
  return out


@jax.jit
def _last_rows(x, n_valid):
  return x[jnp.arange(x.shape[0]), jnp.maximum(n_valid - 1, 0)][:, None]


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # new tokens per prompt
  logits: np.ndarray  # float32 [steps, prompts, vocab]: the head's logits behind each token
  step_s: list[float]  # wall seconds per step (the first two compile: prefill, decode shapes)


class MeshChain:
  """One model's chain of engine block instances on a (global) mesh, run in lockstep.

  The chain runs as two engine segments: everything before the head (one fused call), then the
  head (logits, on-device sampling). The split lets `generate` also return the logits.
  """

  def __init__(self, zoo, model: str, mesh, batch_size: int, max_seq_len: int,
               page_size: int = 16, verify: bool = True):
    manifest = zoo.checked_manifest(model)
    if manifest.get("deltas"):
      raise ValueError(f"model {model!r} is a LoRA adapter: adapters are not run on a "
                       "multi-host mesh (serve its base, or the adapter on one host)")
    self.model = model
    self.mesh = mesh
    self.batch_size = batch_size
    self.max_seq_len = max_seq_len
    self.page_size = page_size
    self.vocab_size = int(manifest["config"]["vocab_size"])
    pages = batch_size * pages_for(max_seq_len, page_size)
    instances: dict[str, LocalBlockInstance] = {}
    table = None
    chain = []
    for block_id in manifest["chain"]:
      if block_id not in instances:
        block = restore_block(zoo, block_id, mesh, verify=verify)
        instances[block_id] = LocalBlockInstance(
            block_id, block, block_id, mesh, batch_size,
            num_pages=pages if block.kind == LAYERS else 0, page_size=page_size,
            max_leases=batch_size, shared_table=table)
      inst = instances[block_id]
      if inst.kind == EMBED:
        table = inst.embed_table
      chain.append(inst)
    if chain[0].kind != EMBED or chain[-1].kind != HEAD:
      raise ValueError(f"model {model!r}: a chain runs from an embed block to a head block")
    if len({id(i) for i in chain}) < len(chain):  # one KV pool cannot be donated twice a call
      raise ValueError(f"model {model!r}: its chain repeats a block, which a multi-host mesh "
                       "does not run")
    self.chain = chain
    self.body = Segment(chain[:-1], 0)
    self.head = Segment(chain[-1:], len(chain) - 1)
    head = chain[-1]
    apply = block_fns.apply_fn(HEAD, head.config)
    self._logits = jax.jit(lambda p, h: apply(p, {}, h, {})[0][:, 0],
                           out_shardings=mesh_lib.replicated(mesh))

  def param_bytes(self) -> tuple[int, int]:
    """(bytes of params on this process's devices, bytes of params in the whole mesh)."""
    local = total = 0
    for inst in {i.key: i for i in self.chain}.values():
      for leaf in jax.tree.leaves(inst.params):
        total += int(leaf.nbytes)
        # Each distinct shard once: replicas of one index on several devices count once.
        seen = set()
        for shard in leaf.addressable_shards:
          key = tuple((s.start, s.stop) for s in shard.index)
          if key not in seen:
            seen.add(key)
            local += int(shard.data.nbytes)
    return local, total

  def _run(self, seg: Segment, x, meta: StepMeta):
    """The engine's dispatch of one segment, with its inputs as global replicated arrays."""
    ints, floats = meta.pack()
    return run_local_segment(seg, x, replicated_input(ints, self.mesh),
                             replicated_input(floats, self.mesh))

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0) -> Generation:
    """Every prompt's next `max_new_tokens` tokens (same call, same arguments, every process)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not 1 <= len(prompts) <= self.batch_size:
      raise ValueError(f"prompts: 1 to {self.batch_size} per call, got {len(prompts)}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"prompts[{i}] is empty")
      if min(p) < 0 or max(p) >= self.vocab_size:
        raise ValueError(f"prompts[{i}] has a token outside [0, {self.vocab_size})")
      if len(p) + max_new_tokens > self.max_seq_len:
        raise ValueError(f"prompts[{i}]: {len(p)} + {max_new_tokens} tokens exceed "
                         f"max_seq_len {self.max_seq_len}")
    b, lens = len(prompts), np.array([len(p) for p in prompts], np.int32)
    width = pages_for(self.max_seq_len, self.page_size)
    leases = [[inst.pool.lease(f"row{r}", int(lens[r]) + max_new_tokens) for r in range(b)]
              for inst in self.body.layers]
    try:
      meta = StepMeta.empty(b, len(self.body.layers), width)
      for li, rows in enumerate(leases):
        for r, lease in enumerate(rows):
          table = lease.pool.table(lease, width)
          meta.page_tables[li, r] = table + [0] * (width - len(table))  # the tail is never read
      meta.temperature[:] = temperature
      for r in range(b):
        meta.set_seed(r, seed + r)
      x = np.zeros((b, int(lens.max())), np.int32)
      for r, p in enumerate(prompts):
        x[r, :len(p)] = p
      meta.n_valid[:] = lens
      tokens, logits, step_s = [], [], []
      for step in range(max_new_tokens):
        t0 = time.perf_counter()
        meta.step[:] = step
        h = self._run(self.body, replicated_input(x, self.mesh), meta)
        head_meta = dataclasses.replace(meta, page_tables=np.zeros((0, b, width), np.int32))
        tok = self._run(self.head, h, head_meta)
        logits.append(local_value(self._logits(self.chain[-1].run_params,
                                               _last_rows(h, replicated_input(meta.n_valid,
                                                                              self.mesh)))))
        tokens.append(local_value(tok))
        meta.starts[:] = lens + step  # the next call feeds tokens[step] at this position
        meta.n_valid[:] = 1
        x = tokens[-1][:, None].astype(np.int32)
        step_s.append(time.perf_counter() - t0)  # tokens were read back: the step is done
    finally:
      for rows in leases:
        for lease in rows:
          lease.release()
    return Generation([t.tolist() for t in np.stack(tokens, axis=1)], np.stack(logits), step_s)


def describe(mesh) -> dict[str, Any]:
  """Processes, devices and axis sizes of a (global) mesh."""
  return {"processes": jax.process_count(), "devices": int(mesh.devices.size),
          "mesh": dict(mesh.shape)}
