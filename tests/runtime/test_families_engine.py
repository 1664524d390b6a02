"""Newer families through the block engine: a partial fine-tune shares its frozen blocks, and
every request gets the tokens it gets alone, batched across tenants and on an 8-device mesh."""

import numpy as np
import pytest

import jblock
from jblock.convert import convert
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
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


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def family(request, tmp_path_factory):
  name, mesh_shape = request.param
  root = tmp_path_factory.mktemp(name)
  base, _ = hf_models.build(name, str(root / "base"))
  variant = hf_models.partial_variants(base, str(root), n=1, top_layers=1)[0]
  specs = []
  for name, d in (("base", base), ("ft", variant)):
    c = convert(d)
    specs.append(ModelSpec(name, c.config, c.blocks))
  expected = []
  for i, p in enumerate(PROMPTS):
    spec = specs[i % 2]
    expected.append(jblock.Model(spec.config, spec.chain).generate([p], NEW_TOKENS)[0].tolist())
  return name, mesh_shape, specs, expected


def test_partial_finetune_shares_frozen_blocks(family):
  _, _, (base, ft), _ = family
  ids = [[b.id for b in s.chain] for s in (base, ft)]
  assert ids[0][:-2] == ids[1][:-2] and ids[0][-1] == ids[1][-1] and ids[0][-2] != ids[1][-2]


def test_batched_across_tenants_equals_alone(family):
  name, mesh_shape, specs, expected = family
  with Engine(specs, sharing=True, mesh_shape=mesh_shape, config=CONFIG) as engine:
    handles = [engine.submit(("base", "ft")[i % 2], p, max_new_tokens=NEW_TOKENS, temperature=0.0)
               for i, p in enumerate(PROMPTS)]
    assert [h.result(timeout=300) for h in handles] == expected, name
    alone = engine.submit("ft", PROMPTS[3], max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert alone.result(timeout=300) == expected[3], name
    stats = engine.stats()
    assert len(stats["blocks"]) == len({b.id for s in specs for b in s.chain})
