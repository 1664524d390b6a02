"""Building the engine a server runs: in process (all-in-one) or over registered workers."""

import concurrent.futures
import logging
import threading
from typing import Callable, Sequence

import grpc

from jblock.cluster import security
from jblock.cluster.links import ClusterLinks
from jblock.cluster.membership import Membership, MembershipConfig
from jblock.cluster.remote import Placer, remote_factory
from jblock.cluster.replan import ReplanConfig, Replanner, initial_plan
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo.loading import spec_from_zoo


def zoo_models(zoo_dir: str, models: Sequence[str] | None) -> list[str]:
  """The models to serve: those named (default: every model of the zoo) whose manifests pass
  the zoo's integrity checks (jblock.zoo.integrity). A refused model is logged, one line with
  its name and reason, and left out, so one bad manifest never stops the others; an unknown
  name still fails start-up (NotFoundError), and so does a zoo whose every model is refused."""
  from jblock.zoo.integrity import partition
  from jblock.zoo.store import Zoo
  zoo = Zoo(zoo_dir)
  names = list(models) if models else zoo.models()
  if not names:
    raise ValueError(f"the zoo at {zoo_dir} has no models (convert one with tools.convert)")
  servable, refused = partition(zoo, names)
  for name, reason in refused.items():
    logging.error("jblock: refusing model %r: %s", name, reason)
  if not servable:
    raise ValueError(f"every model was refused ({', '.join(refused)}): run python -m tools.zoo "
                     "verify, and rehash the manifests you trust")
  return servable


def local_engine(zoo_dir: str, models: Sequence[str] | None, sharing: bool = True,
                 mesh_shape: Sequence[int] | None = None,
                 config: EngineConfig | None = None) -> Engine:
  """The embedded default: every block on this process's devices, no network hop inside."""
  return Engine.from_zoo(zoo_dir, zoo_models(zoo_dir, models), sharing=sharing,
                         mesh_shape=mesh_shape, config=config)


class ClusterEngine(Engine):
  """An engine over workers; its stats add `placement`: where each block lives and why."""

  replanner: Replanner | None = None  # replanner.replan(reason): re-plan under measured load

  def __init__(self, specs, *, make_replanner: Callable[[Engine], Replanner], **kwargs):
    """`make_replanner(engine)`: the replanner over this engine (built once its models are
    placed); the other arguments are Engine's."""
    super().__init__(specs, **kwargs)
    self.replanner = make_replanner(self)

  def close(self, drain_timeout: float = 0.0) -> None:
    if self.replanner is not None:
      self.replanner.stop()
    super().close(drain_timeout)
    if self.replanner is not None:
      self.replanner.placer.rows.close()

  def stats(self):
    out = super().stats()
    out["placement"] = self.replanner.view() if self.replanner is not None else {}
    # Per worker: what crossed the coordinator (hidden-state, token and metadata bytes) and how
    # hidden rows moved (kept, pushed worker to worker, read by reference) (jblock.cluster.rows).
    out["hidden_state_traffic"] = (self.replanner.placer.rows.stats()
                                   if self.replanner is not None else {})
    return out


def _release_unplanned(kept: dict[str, list[str]], hosts: dict[str, list[str]],
                       links: ClusterLinks) -> None:
  """Unhosts the blocks workers kept from an earlier coordinator that this plan puts elsewhere
  (or nowhere), so they do not hold memory no chain uses. Best effort: a failure is logged."""
  for block, workers in kept.items():
    for address in workers:
      if address in hosts.get(block, ()):
        continue
      try:
        with links.channel(address) as channel:
          pb_grpc.BlockHostStub(channel).UnhostBlock(
              pb.UnhostBlockRequest(block_id=block), timeout=links.deadlines.unhost_s)
      except grpc.RpcError as e:
        logging.warning("jblock: could not release block %s on %s: %s", block[:12], address,
                        e.code().name)


def distributed_engine(zoo_dir: str, models: Sequence[str] | None, num_workers: int,
                       registry_port: int, host: str = "127.0.0.1", sharing: bool = True,
                       config: EngineConfig | None = None, wait_s: float = 120.0,
                       progress=print,
                       membership: MembershipConfig | None = None,
                       links: ClusterLinks | None = None,
                       replan: ReplanConfig | None = None,
                       executor_factory=None) -> tuple[Engine, grpc.Server]:
  """Waits for `num_workers` workers to register, then places the chains on them by locality
  (jblock.cluster.placement: hops vs per-worker compute under memory; `replan` sets its model).

  Workers may join later (blocks of models loaded afterwards, and blocks re-placed after a
  worker dies, go to the live worker hosting the fewest). Returns the engine and the registry
  server (stop it on shutdown). `links`: the cluster's credentials (checked on the registry,
  presented to workers) and per-step RPC deadlines. `executor_factory`: as Engine's (benches
  compare one executor per worker with a single shared one).
  """
  from jblock.zoo.store import Zoo
  config = config or EngineConfig()
  registry = Membership(membership)
  links = links or ClusterLinks()
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8),
                       interceptors=security.server_interceptors(links.credentials))
  pb_grpc.add_RegistryServicer_to_server(registry, server)
  bound = security.add_port(server, f"{host}:{registry_port}", links.credentials)
  server.start()
  progress(f"jblock: worker registry on {host}:{bound}, waiting for {num_workers} worker(s)")
  try:
    workers = registry.wait_for(num_workers, wait_s)
    zoo = Zoo(zoo_dir)
    names = zoo_models(zoo_dir, models)
    cache = {}
    specs = [spec_from_zoo(zoo, name, cache, load_params=False) for name in names]
    placer = Placer(registry, {}, links)
    kept = registry.hosted()  # blocks workers kept from an earlier coordinator
    plan = initial_plan(zoo, config, registry, {s.name: s.block_ids for s in specs}, replan,
                        kept=kept)
    placer.plan.update(plan.primary())
    adopted = sum(1 for b, ws in plan.hosts.items() for w in ws if w in kept.get(b, ()))
    progress(f"jblock: placing {len(plan.hosts)} blocks on {', '.join(workers)} "
             f"({plan.hops_per_s:g} cross-worker hops per chain step"
             + (f"; {adopted} already hosted there" if kept else "") + ")")
    factory = remote_factory(placer, zoo_dir, config)
    engine = ClusterEngine(
        specs, sharing=sharing, mesh_shape=(1, 1), config=config, zoo=zoo,
        instance_factory=factory, executor_factory=executor_factory, cluster_stats=registry.stats,
        make_replanner=lambda e: Replanner(e, placer, zoo, config, registry, replan, progress,
                                           plan=plan))
    replanner = engine.replanner
    replicated = {b: ws for b, ws in plan.hosts.items() if len(ws) > 1}
    if replicated:  # the plan's replicas, hosted once the primaries serve
      try:
        replanner.apply(replicated, "initial plan")
      except Exception:
        engine.close()
        raise
    _release_unplanned(kept, plan.hosts, links)
    registry.on_dead(lambda address, reason: engine.placement_lost(f"worker:{address}", reason))
    registry.on_join(lambda address: engine.retry_lost())
    if replanner.config.interval_s > 0 or replanner.config.on_join:
      registry.on_join(lambda address: threading.Thread(
          target=replanner.replan_safely, args=(f"worker {address} joined",), daemon=True).start())
    replanner.start()
    return engine, server
  except Exception:
    server.stop(0)
    registry.stop()
    raise
