"""The zoo stores each expert once: a fine-tune that retrained 2 of 4 experts writes only those."""

import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jblock
from jblock.zoo import Zoo, cli
from jblock.zoo.sizes import human_bytes
from tests import hf_models

CHANGED = (1, 3)  # experts retrained in the top layer
TOP = 2  # top layer of the 3-layer tiny Mixtral
PROMPT = [5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("experts")
  base, _ = hf_models.build("mixtral", str(root / "base"))
  ft = str(root / "ft")
  shutil.copytree(base, ft)
  path = os.path.join(ft, "model.safetensors")
  tensors = load_file(path)
  rng = np.random.default_rng(0)
  for j in CHANGED:
    for w in ("w1", "w2", "w3"):
      name = f"model.layers.{TOP}.block_sparse_moe.experts.{j}.{w}.weight"
      tensors[name] = (tensors[name] + rng.normal(0, 0.3, tensors[name].shape)).astype(np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  return base, ft


def test_finetune_of_two_experts_stores_only_those(dirs, tmp_path):
  base, ft = dirs
  zoo = Zoo(str(tmp_path / "zoo"))
  first = zoo.convert(base, "base")
  second = zoo.convert(ft, "ft")
  # 23 x 40 float32 for each of w1, w2, w3 of each changed expert; nothing else is new.
  expert_bytes = 3 * 23 * 40 * 4
  assert second.bytes_written == len(CHANGED) * expert_bytes
  assert len(second.written) == 1 and second.written[0] == second.chain[1 + TOP]
  stats = zoo.stats()
  assert stats.stored_bytes == first.model_bytes + len(CHANGED) * expert_bytes
  assert stats.logical_bytes == 2 * first.model_bytes
  # Every layer: one rest part and 4 experts; the fine-tune adds 2 experts and its top layer's
  # rest part is the base's.
  assert stats.stored_parts == 3 * (1 + 4) + len(CHANGED)
  # tools.zoo stats: the part count and, for the part-stored layers blocks, stored vs logical.
  layer_bytes = [zoo.block_record(i)["nbytes"] for i in first.chain[1:1 + 3]]
  logical = sum(layer_bytes) + layer_bytes[TOP]
  parts_stored = sum(layer_bytes) + len(CHANGED) * expert_bytes
  assert stats.part_blocks == 4
  assert (stats.part_block_bytes, stats.part_bytes) == (logical, parts_stored)
  assert (f"  expert parts:  {3 * 5 + len(CHANGED)} stored for 4 blocks: "
          f"{human_bytes(parts_stored)} stored ({parts_stored} B) vs {human_bytes(logical)} "
          f"logical ({logical} B: each such block whole)") in cli.stats_lines(zoo, stats)
  assert zoo.verify() == []

  # Reassembled from parts, bit-exactly: same ids, same logits, transformers' tokens.
  model = jblock.from_zoo(zoo.root, "ft")
  assert [b.id for b in model.blocks] == second.chain
  np.testing.assert_array_equal(model.logits([PROMPT]), jblock.from_hf(ft).logits([PROMPT]))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      ft, dtype=torch.float32, experts_implementation="eager").eval()
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False)[0, len(PROMPT):]
  assert model.generate([PROMPT], max_new_tokens=12)[0].tolist() == ref.tolist()

  # Removing the fine-tune frees exactly its two experts (and its top layer's block record).
  zoo.remove_model("ft")
  report = zoo.gc()
  assert report.removed == [second.chain[1 + TOP]]
  assert zoo.stats().stored_parts == 3 * (1 + 4)
  assert zoo.stats().stored_bytes == first.model_bytes
  np.testing.assert_array_equal(jblock.from_zoo(zoo.root, "base").logits([PROMPT]),
                                jblock.from_hf(base).logits([PROMPT]))
