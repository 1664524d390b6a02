"""One benchmark server process: the real gRPC server over one serving mode.

  python -m jblock.bench.server_proc --mode=block --zoo=DIR --models=v1,v2 --port=0
  python -m jblock.bench.server_proc --mode=hf --hf_dirs=v1=DIR1,v2=DIR2 --port=0

block: the block engine sharing blocks across variants; per_model: the same engine with
sharing off (every model its own instance of every block); hf: transformers models
(jblock.bench.hf_baseline). Each mode runs in its own process so its peak memory is its own.
Prints the server's ready line once listening; SIGTERM drains and exits.
"""

import collections
import dataclasses
import threading

from absl import app
from absl import flags

MODES = ("block", "per_model", "hf")

_MODE = flags.DEFINE_enum("mode", "block", MODES, "Serving mode of this process.")
_ZOO = flags.DEFINE_string("zoo", None, "Block zoo directory (block, per_model).")
_MODELS = flags.DEFINE_list("models", [], "Model names in the zoo (block, per_model).")
_HF_DIRS = flags.DEFINE_list("hf_dirs", [], "name=HF checkpoint dir, per model (hf).")
_PORT = flags.DEFINE_integer("port", 0, "gRPC port; 0 picks a free one.", lower_bound=0)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 512,
                                    "Concurrent RPCs (one per in-flight request).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Max requests per block batch (hf: per generate).",
                              lower_bound=1)
_KV_SLOTS = flags.DEFINE_integer("kv_slots", 16, "KV slots per layers instance.", lower_bound=1)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 256, "Prompt + output tokens per request.",
                                    lower_bound=2)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Longest prompt piece per step.",
                                      lower_bound=1)
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 1024, "Admission queue bound.", lower_bound=1)
_PROVISION = flags.DEFINE_enum(
    "provision", "tenants", ["tenants", "uniform"],
    "tenants: a block shared by k served models gets k x batch_size and k x kv_slots (the "
    "per-model baseline's capacity, pooled); uniform: every instance the same.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "Cap on a shared block's batch.",
                                  lower_bound=1)
_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache.")


def build_engine():
  if _MODE.value == "hf":
    from jblock.bench.hf_baseline import HFEngine
    dirs = dict(item.split("=", 1) for item in _HF_DIRS.value)
    return HFEngine(dirs, batch_size=_BATCH.value, max_waiting=_MAX_WAITING.value,
                    max_seq_len=_MAX_SEQ_LEN.value)
  from jblock.runtime.engine import Engine, EngineConfig
  from jblock.zoo.loading import spec_from_zoo
  from jblock.zoo.store import Zoo
  config = EngineConfig(batch_size=_BATCH.value, kv_slots=_KV_SLOTS.value,
                        max_seq_len=_MAX_SEQ_LEN.value, prefill_chunk=_PREFILL_CHUNK.value,
                        length_buckets=tuple(sorted({16, _PREFILL_CHUNK.value})),
                        max_waiting=_MAX_WAITING.value, warmup=True,
                        compilation_cache_dir=_CACHE.value)
  zoo = Zoo(_ZOO.value)
  cache = {}
  specs = [spec_from_zoo(zoo, name, cache) for name in _MODELS.value]
  sharing = _MODE.value == "block"
  if _PROVISION.value == "tenants" and sharing:
    config = _provision_by_tenants(config, specs)
  # One device: the 2-core bench machine gains nothing from splitting a small model.
  return Engine(specs, sharing=sharing, mesh_shape=(1, 1), config=config, zoo=zoo)


def _provision_by_tenants(config, specs):
  """Block instances sized by how many served models share them (BlockLLM's per-block
  provisioning): a block of k models gets k times the KV slots and batch of a one-model block,
  so the block engine holds exactly the KV memory and batch capacity per model that the
  per-model baseline holds, only not split into N separate pools."""
  tenants = collections.Counter(i for spec in specs for i in set(spec.block_ids))
  shared = {i: k for i, k in tenants.items() if k > 1}
  return dataclasses.replace(
      config,
      batch_size_by_block=tuple((i, min(_MAX_BATCH.value, config.batch_size * k))
                                for i, k in shared.items()),
      kv_slots_by_block=tuple((i, config.kv_slots * k) for i, k in shared.items()))


class CompileCounter:
  """Counts JAX lowerings (every new executable: jitted step buckets, and the eager ops the
  engine runs between blocks) and the seconds they took, from jax.monitoring events."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._lock = threading.Lock()
    import jax
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event.startswith("/jax/core/compile/"):
      with self._lock:
        self.seconds += duration
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
          self.count += 1


class _WithCompileStats:
  """The engine, with the compile counter in its stats (the bench's warm-up watches it)."""

  def __init__(self, engine, counter: CompileCounter):
    self._engine = engine
    self._counter = counter

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def stats(self) -> dict:
    stats = self._engine.stats()
    stats["compiles"] = {"count": self._counter.count, "seconds": round(self._counter.seconds, 4)}
    return stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jblock.serving import server
  if _MODE.value == "hf":
    engine = build_engine()
  else:
    counter = CompileCounter()  # before the engine: its start-up compiles count too
    engine = _WithCompileStats(build_engine(), counter)
  server.serve(engine, _PORT.value, 0, host=_HOST.value, max_workers=_MAX_WORKERS.value,
               drain_timeout_s=5.0)


if __name__ == "__main__":
  app.run(main)
