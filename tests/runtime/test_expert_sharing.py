"""Experts shared in device memory: two fine-tunes of one MoE layer hold each shared expert once.

Fine-tune A retrained expert 1 of the top layer of a tiny 8-expert Mixtral, fine-tune B expert 3:
their top layers blocks differ but share 6 experts and every other leaf. Served together, the
engine loads each part once (the same jax.Arrays in both blocks); tokens equal transformers', on
one device and with experts sharded on the model axis of the (4, 2) mesh.
"""

import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo import Zoo
from tests import hf_models

EXPERTS = 8
TOP = 2  # top layer of the 3-layer model
RETRAINED = {"ft_a": 1, "ft_b": 3}
PROMPTS = [[13, 7, 96, 4, 50, 22, 61, 30, 8, 1]]
NEW = 6
CONFIG = EngineConfig(batch_size=4, kv_slots=4, max_seq_len=32, prefill_chunk=16,
                      length_buckets=(8, 16), warmup=False)
EXPERT_BYTES = 3 * 40 * 22 * 4  # w1, w2, w3 of hidden 40, width 22, float32


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("expert_sharing")
  config = transformers.MixtralConfig(**dict(hf_models.BASE, num_local_experts=EXPERTS,
                                             num_experts_per_tok=2, intermediate_size=22))
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32, experts_implementation="eager").eval()
  base = str(root / "base")
  model.save_pretrained(base)
  zoo = Zoo(str(root / "zoo"))
  references = {}
  for name, j in RETRAINED.items():
    ft = str(root / name)
    shutil.copytree(base, ft)
    path = os.path.join(ft, "model.safetensors")
    tensors = load_file(path)
    rng = np.random.default_rng(j)
    for w in ("w1", "w2", "w3"):
      key = f"model.layers.{TOP}.mlp.experts.{j}.{w}.weight"
      if key not in tensors:
        key = f"model.layers.{TOP}.block_sparse_moe.experts.{j}.{w}.weight"
      tensors[key] = (tensors[key] + rng.normal(0, 0.5, tensors[key].shape)).astype(np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    zoo.convert(ft, name)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        ft, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
      references[name] = [
          torch_model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
  return zoo, references


def _expected_bytes(zoo):
  chains = {name: zoo.manifest(name)["chain"] for name in RETRAINED}
  a, b = chains["ft_a"], chains["ft_b"]
  assert a[:1 + TOP] == b[:1 + TOP] and a[-1] == b[-1] and a[1 + TOP] != b[1 + TOP]
  shared = sum(zoo.block_record(i)["nbytes"] for i in a[:1 + TOP] + a[-1:])
  top = zoo.block_record(a[1 + TOP])["nbytes"]
  rest = top - EXPERTS * EXPERT_BYTES
  # Both top blocks: one rest part and 6 shared experts, plus each one's own 2 of experts 1, 3.
  return shared + rest + (EXPERTS - 2 + 2 * 2) * EXPERT_BYTES, 2 * (shared + top)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)], ids=["one_device", "mesh_4x2"])
def test_shared_experts_are_resident_once(zoo, mesh_shape):
  zoo, references = zoo
  shared_bytes, unshared_bytes = _expected_bytes(zoo)
  engine = Engine.from_zoo(zoo.root, list(RETRAINED), mesh_shape=mesh_shape, config=CONFIG)
  try:
    handles = {(name, i): engine.submit(name, p, max_new_tokens=NEW, temperature=0.0)
               for name in RETRAINED for i, p in enumerate(PROMPTS)}
    for (name, i), h in handles.items():
      assert h.result(timeout=300) == references[name][i], (name, i)
    stats = engine.stats()
    assert stats["resident_bytes"] == shared_bytes
    tops = [engine._instances[zoo.manifest(n)["chain"][1 + TOP]] for n in RETRAINED]
    ga, gb = (t.params["layer_0"]["mlp"]["experts"]["gate"] for t in tops)
    assert len(ga) == EXPERTS and all((ga[e] is gb[e]) == (e not in (1, 3)) for e in range(EXPERTS))
    if mesh_shape == (4, 2):  # each expert's width split on the model axis
      assert ga[0].sharding.spec == PartitionSpec(None, "model") and ga[0].shape == (40, 22)
  finally:
    engine.close()
  if mesh_shape == (1, 1):  # the per-model baseline holds both whole
    baseline = Engine.from_zoo(zoo.root, list(RETRAINED), sharing=False, config=CONFIG)
    try:
      assert baseline.stats()["resident_bytes"] == unshared_bytes
    finally:
      baseline.close()
