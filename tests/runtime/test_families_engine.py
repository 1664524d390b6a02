"""Newer families through the whole system: zoo conversion (MoE stored expert by expert), the
engine loading from the zoo, gRPC clients. A partial fine-tune shares its frozen blocks, and
every request gets the tokens it gets alone, batched across tenants and on an 8-device mesh."""

import concurrent.futures

import numpy as np
import pytest

import jblock
from jblock.client import Client
from jblock.runtime.engine import Engine, EngineConfig
from jblock.serving.coordinator import build_server
from jblock.zoo import Zoo
from tests import hf_models

NEW_TOKENS = 8
CONFIG = EngineConfig(batch_size=4, kv_slots=6, max_seq_len=48, prefill_chunk=16,
                      length_buckets=(8, 16), warmup=False)
# Lengths 3..20: some prompts take two prefill chunks; every window (4-6) is shorter.
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 97, 3 + (i * 7) % 18)]
           for i in range(6)]
# (family, mesh): soft-capped, windowed Gemma 2 on one device; MoE on the 8-device (data 4,
# model 2) mesh. The other families share these code paths (tests/models/test_parity.py).
CASES = [("gemma2", (1, 1)), ("mixtral", (4, 2))]
MODELS = ("base", "ft")


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def family(request, tmp_path_factory):
  name, mesh_shape = request.param
  root = tmp_path_factory.mktemp(name)
  base, _ = hf_models.build(name, str(root / "base"))
  variant = hf_models.partial_variants(base, str(root), n=1, top_layers=1)[0]
  zoo = Zoo(str(root / "zoo"))
  reports = [zoo.convert(d, m) for m, d in zip(MODELS, (base, variant))]
  # Greedy tokens of the reference path (equal to transformers': tests/models/test_parity.py).
  expected = [jblock.from_zoo(zoo.root, MODELS[i % 2]).generate([p], NEW_TOKENS)[0].tolist()
              for i, p in enumerate(PROMPTS)]
  return name, mesh_shape, zoo, reports, expected


def test_partial_finetune_shares_frozen_blocks(family):
  _, _, zoo, (base, ft), _ = family
  assert ft.written == [ft.chain[-2]] and ft.chain[:-2] == base.chain[:-2]
  assert ft.chain[-1] == base.chain[-1]
  assert zoo.stats().stored_bytes == base.model_bytes + ft.bytes_written


def test_batched_across_tenants_equals_alone(family):
  name, mesh_shape, zoo, reports, expected = family
  engine = Engine.from_zoo(zoo.root, MODELS, mesh_shape=mesh_shape, config=CONFIG)
  server, port = build_server(engine, 0)
  server.start()
  try:
    def one(i):
      with Client(f"127.0.0.1:{port}") as client:
        return client.generate_tokens(MODELS[i % 2], prompt_tokens=PROMPTS[i],
                                      max_tokens=NEW_TOKENS, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
      assert list(pool.map(one, range(len(PROMPTS)))) == expected, name
    alone = engine.submit("ft", PROMPTS[3], max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert alone.result(timeout=300) == expected[3], name
    assert len(engine.stats()["blocks"]) == len({i for r in reports for i in r.chain})
  finally:
    server.stop(0)
    engine.close()
