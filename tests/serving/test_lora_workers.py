"""Adapters whose base blocks live on workers: each worker holds the adapter bank of the layers
blocks it hosts, swaps install factors there (InstallAdapter), a batch sends its bank columns,
and a block moved to another worker gets its resident adapters back before the replay. A
compressed full fine-tune (int8 deltas) shares the bank's one slot with the LoRA adapters.
Malformed installs get INVALID_ARGUMENT naming the field.

Coordinator and two workers run in this process (real gRPC servers on 127.0.0.1)."""

import grpc
import numpy as np
import pytest

from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.proto.tensor_codec import to_tensor_map
from jblock.runtime.engine import Engine, EngineConfig
from jblock.serving.engines import distributed_engine
from jblock.zoo.full_deltas import DeltaOptions, convert_full_delta
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.lora_adapters import make_adapter
from tests.serving.serving_helpers import InProcessWorkers, free_port

PROMPTS = [[5, 17, 3, 88, 42, 7], [9, 1, 64, 33], [70, 2, 2, 19, 8]]
MODELS = ("base", "a1", "a2", "d1")
NEW = 8
# One bank slot for two adapters: every switch between them is a swap (an install RPC).
CONFIG = EngineConfig(batch_size=4, kv_slots=8, max_seq_len=32, prefill_chunk=16,
                      length_buckets=(16,), warmup=False, lora_slots=1, lora_max_rank=8)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_workers")
  base, _ = hf_models.build("llama", str(root / "base"))
  make_adapter(base, str(root / "p1"), targets=["q_proj", "v_proj"], r=4, alpha=8, std=0.3)
  make_adapter(base, str(root / "p2"), targets=["q_proj", "v_proj", "down_proj"], r=8, alpha=4,
               std=0.3, seed=1)
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  zoo.convert_peft(str(root / "p1"), "base", "a1")
  zoo.convert_peft(str(root / "p2"), "base", "a2")
  ft = hf_models.full_finetune(base, str(root / "ft"), std=0.3)
  calibration = str(root / "calibration.npy")
  np.save(calibration, np.random.default_rng(0).integers(0, 97, 512))
  convert_full_delta(zoo, ft, "base", "d1", DeltaOptions(method="int8", calibration=calibration))
  return zoo.root


def _serve(engine, jobs) -> dict:
  handles = {job: engine.submit(job[0], PROMPTS[job[1]], max_new_tokens=NEW) for job in jobs}
  return {job: h.result(timeout=300) for job, h in handles.items()}


JOBS = [(m, i) for i in range(len(PROMPTS)) for m in MODELS]


@pytest.fixture(scope="module")
def in_process(zoo_dir):
  with Engine.from_zoo(zoo_dir, models=list(MODELS), mesh_shape=(1, 1), config=CONFIG) as engine:
    out = _serve(engine, JOBS)
  assert all(out[m, 0] != out["base", 0] for m in ("a1", "a2", "d1"))
  return out


@pytest.fixture(scope="module")
def cluster(zoo_dir):
  """Two in-process workers heartbeating to a coordinator engine over them."""
  registry = f"127.0.0.1:{free_port()}"
  workers = InProcessWorkers(zoo_dir, registry)
  engine = registry_server = None
  try:
    addresses = [workers.join() for _ in range(2)]
    engine, registry_server = distributed_engine(
        zoo_dir, list(MODELS), 2, int(registry.rsplit(":", 1)[1]), config=CONFIG, wait_s=60,
        progress=lambda *_: None)
    yield engine, addresses
  finally:
    if engine is not None:
      engine.close()
    workers.close()
    if registry_server is not None:
      registry_server.stop(0)


def _layers_blocks(engine) -> list[dict]:
  return [b for b in engine.stats()["blocks"] if b["kind"] == "layers"]


def test_adapters_on_workers_give_the_in_process_tokens(cluster, in_process):
  engine, workers = cluster
  banked = [b for b in _layers_blocks(engine) if b["lora_bank_bytes"]]
  assert banked and all(b["worker"] in workers for b in banked)
  assert _serve(engine, JOBS) == in_process
  swaps = engine.stats()["adapters"]["misses"]
  assert swaps >= 3  # one slot, three delta models: each was installed over the wire
  # Move every banked block to the other worker: the adapter resident in the slot is installed
  # there again before the replay, so a request of it (a bank hit, no swap) stays exact.
  resident = next(iter(engine.stats()["adapters"]["resident"]))
  for block in banked:
    other = next(w for w in workers if w != block["worker"])
    engine.relocate([block["block_id"]], "test move", to=other).join(60)
  moved = {b["block_id"]: b["worker"] for b in _layers_blocks(engine)}
  assert all(moved[b["block_id"]] != b["worker"] for b in banked)
  got = _serve(engine, [(resident, i) for i in range(len(PROMPTS))])
  assert got == {(resident, i): in_process[resident, i] for i in range(len(PROMPTS))}
  assert engine.stats()["adapters"]["misses"] == swaps  # served from the re-installed slot


def _install(address, block_id, slot, factors):
  request = pb.InstallAdapterRequest(block_id=block_id, slot=slot)
  to_tensor_map(factors, request.factors)
  with grpc.insecure_channel(address) as channel:
    pb_grpc.BlockHostStub(channel).InstallAdapter(request, timeout=30)


def test_malformed_installs_are_invalid_argument(cluster, zoo_dir):
  engine, _ = cluster
  block = next(b for b in _layers_blocks(engine) if b["lora_bank_bytes"])
  embed = next(b for b in engine.stats()["blocks"] if b["kind"] == "embed")
  address, block_id = block["worker"], block["block_id"]
  hidden = Zoo(zoo_dir).load_block(block_id).config["hidden_size"]
  good = {"layer_0/attn/q/a": np.zeros((8, hidden), np.float32),
          "layer_0/attn/q/b": np.zeros((8, hidden), np.float32)}
  cases = [
      (block_id, 1, good, "slot"),  # one slot: only slot 0
      (block_id, 0, {**good, "layer_0/attn/q/a": np.zeros((4, hidden), np.float32)},
       "factors['layer_0/attn/q/a']"),  # not padded to the bank's max rank
      (block_id, 0, {"layer_0/attn/q/a": good["layer_0/attn/q/a"]}, "factors['layer_0/attn/q/b']"),
      (block_id, 0, {"layer_0/attn/k/a": good["layer_0/attn/q/a"]}, "factors['layer_0/attn/k/a']"),
      (block_id, 0, {**good, "layer_0/attn/q/b": np.full((8, hidden), np.nan, np.float32)},
       "factors['layer_0/attn/q/b']"),
      # The embed holds d1's compressed table delta, but no LoRA target.
      (embed["block_id"], 0, good, "factors['layer_0/attn/q/a']"),
      (block_id, 0, {"layer_0/attn/q/int8/codes": np.zeros((hidden, hidden), np.float32)},
       "factors['layer_0/attn/q/int8/codes']"),  # int8 codes sent as floats
      (block_id, 0, {"layer_0/attn/q/int8/on": np.int32(7)}, "factors['layer_0/attn/q/int8/on']"),
      (block_id, 0, {"layer_0/attn/q/bitdelta/bits": np.zeros((5, hidden), np.uint8)},
       "factors['layer_0/attn/q/bitdelta/bits']"),  # no bitdelta model: not banked
  ]
  for target, slot, factors, field in cases:
    with pytest.raises(grpc.RpcError) as err:
      _install(embed["worker"] if target == embed["block_id"] else address, target, slot, factors)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
    assert field in err.value.details(), (field, err.value.details())
