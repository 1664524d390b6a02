"""Flags shared by the launch scripts to build an engine (block engine on a zoo, or the mock)."""

import os

from absl import app
from absl import flags

from jblock.runtime.engine import EngineConfig

_ENGINE = flags.DEFINE_enum("engine", "block", ["block", "mock"],
                            "block: the block engine over --zoo; mock: fake deterministic tokens.")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory.")
_MODELS = flags.DEFINE_list("models", [], "Models of the zoo to serve; empty = all of them.")
_DEMO = flags.DEFINE_boolean("demo", False,
                             "Build a demo zoo (tokenizer, base, fine-tuned variants) into --zoo "
                             "first if it is not there; offline.")
_SHARING = flags.DEFINE_boolean("sharing", True,
                                "Share identical blocks across models; false = per-model baseline.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", [], "data,model device mesh; empty = all devices on model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Default per-block batch size.", lower_bound=1)
_KV_SLOTS = flags.DEFINE_integer("kv_slots", 16, "Concurrent requests per layers block (KV leases).",
                                 lower_bound=1)
_KV_PAGES = flags.DEFINE_integer("kv_pages", 0, "KV pages per layers block; 0 = kv_slots "
                                 "full-length requests' worth.", lower_bound=0)
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
_FUSE = flags.DEFINE_boolean("fuse_segments", True, "Run consecutive blocks that every model "
                             "traverses together as one jitted call.")
_FUSE_SHARED = flags.DEFINE_boolean("fuse_through_shared", False, "Fuse each model's chain into "
                                    "one call even through blocks other models share (weights "
                                    "held once, batches per model; fewer calls per step).")
_PREFIX_CACHING = flags.DEFINE_boolean(
    "enable_prefix_caching", True, "Reuse the KV of prefixes already computed (system prompts, "
    "earlier turns), across models wherever they share a block and everything below it.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "Prompt + generated tokens per request "
                                    "(at most the model's own maximum).", lower_bound=2)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Longest prompt piece per step.",
                                      lower_bound=1)
# One server (all-in-one or coordinator) holds >= 1,000 concurrent streams by default: a waiting
# request costs the scheduler a queue entry and the server a parked thread
# (jblock.serving.coordinator.build_server).
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 1024, "Admission queue bound.", lower_bound=1)
_MAX_WAITING_PER_MODEL = flags.DEFINE_integer("max_waiting_per_model", 0, "Admission queue bound "
                                              "per model; 0 = --max_waiting.", lower_bound=0)
_WARMUP = flags.DEFINE_boolean("warmup", True, "Compile every decode batch/page-width bucket and "
                               "the prefill buckets at start-up.")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", "checkpoints/xla_cache",
                                 "Persistent XLA compilation cache; empty = off.")
_MOCK_MODELS = flags.DEFINE_list("mock_models", ["mock-a", "mock-b"], "Mock model names.")
_MOCK_STEP_DELAY_S = flags.DEFINE_float("mock_step_delay_s", 0.0, "Mock decode step time.")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "tokenizer.json dir for mock models.")


def engine_config() -> EngineConfig:
  return EngineConfig(batch_size=_BATCH_SIZE.value, kv_slots=_KV_SLOTS.value,
                      kv_pages=_KV_PAGES.value, page_size=_PAGE_SIZE.value,
                      fuse_segments=_FUSE.value, fuse_through_shared=_FUSE_SHARED.value,
                      max_seq_len=_MAX_SEQ_LEN.value,
                      prefill_chunk=_PREFILL_CHUNK.value, max_waiting=_MAX_WAITING.value,
                      max_waiting_per_model=_MAX_WAITING_PER_MODEL.value, warmup=_WARMUP.value,
                      enable_prefix_caching=_PREFIX_CACHING.value,
                      compilation_cache_dir=os.path.abspath(_CACHE_DIR.value) if _CACHE_DIR.value else None)


def mesh_shape():
  if not _MESH_SHAPE.value:
    return None
  try:
    shape = tuple(int(v) for v in _MESH_SHAPE.value)
  except ValueError:
    raise app.UsageError(f"--mesh_shape must be two integers data,model; got {_MESH_SHAPE.value}")
  if len(shape) != 2:
    raise app.UsageError(f"--mesh_shape must be two integers data,model; got {_MESH_SHAPE.value}")
  return shape


def zoo_dir() -> str:
  return _ZOO.value


def prepare_zoo() -> str:
  """The zoo directory, built first when --demo asks for it and it is missing."""
  if _DEMO.value:
    from jblock.train import demo
    demo.build_demo_zoo(_ZOO.value)
  from jblock.zoo.store import Zoo
  if not os.path.isdir(_ZOO.value) or not Zoo(_ZOO.value).models():
    raise app.UsageError(f"--zoo={_ZOO.value} holds no models: convert one with tools.convert, "
                         "or pass --demo to build the demo zoo")
  return _ZOO.value


def build_engine():
  if _ENGINE.value == "mock":
    from jblock.runtime.mock_engine import MockEngine, mock_models
    return MockEngine(mock_models(_MOCK_MODELS.value, tokenizer_dir=_TOKENIZER_DIR.value),
                      step_delay_s=_MOCK_STEP_DELAY_S.value, kv_slots=_KV_SLOTS.value,
                      max_queue=_MAX_WAITING.value)
  from jblock.errors import JBlockError
  from jblock.serving.engines import local_engine
  zoo = prepare_zoo()
  try:
    return local_engine(zoo, _MODELS.value, sharing=_SHARING.value, mesh_shape=mesh_shape(),
                        config=engine_config())
  except (JBlockError, ValueError) as e:
    raise app.UsageError(str(e))


def build_distributed_engine(num_workers: int, registry_port: int, host: str, wait_s: float,
                             membership=None, links=None, replan=None):
  from jblock.serving.engines import distributed_engine
  return distributed_engine(prepare_zoo(), _MODELS.value, num_workers, registry_port, host=host,
                            sharing=_SHARING.value, config=engine_config(), wait_s=wait_s,
                            membership=membership, links=links, replan=replan)
