"""Converted models compute what transformers computes: logits within 1e-4, equal greedy tokens."""

import copy

import numpy as np
import pytest
import torch

import jblock
from jblock.models import rope as rope_lib
from tests import hf_models

LOGIT_TOL = 1e-4
# bfloat16 keeps 8 mantissa bits: errors of ~1% of the logit scale are expected.
BF16_REL_TOL = 0.05

PROMPTS = [[5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12], [13, 7, 96, 4, 50, 22], [90, 1, 45]]


@pytest.fixture(scope="module", params=sorted(hf_models.CONFIGS))
def pair(request, tmp_path_factory):
  hf_dir, torch_model = hf_models.build(request.param, str(tmp_path_factory.mktemp(request.param)))
  return request.param, hf_dir, torch_model


def _reset_dynamic_rope(model):
  # transformers' dynamic RoPE keeps the longest length seen across calls; each reference
  # sequence starts fresh, as it would in its own process.
  for module in model.modules():
    if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
      module.inv_freq = module.original_inv_freq.clone()
      module.max_seq_len_cached = module.original_max_seq_len


def _torch_logits(model, prompt):
  _reset_dynamic_rope(model)
  with torch.no_grad():
    return model(torch.tensor([prompt])).logits[0].float().numpy()


def test_logits_match_transformers_on_mixed_lengths(pair):
  name, hf_dir, torch_model = pair
  model = jblock.from_hf(hf_dir)
  ours = model.logits(PROMPTS)
  assert ours.dtype == np.float32 and ours.shape == (3, 11, 97)
  for row, prompt in enumerate(PROMPTS):
    ref = _torch_logits(torch_model, prompt)
    np.testing.assert_allclose(ours[row, :len(prompt)], ref, atol=LOGIT_TOL, rtol=0, err_msg=name)


def test_greedy_generate_matches_transformers(pair):
  name, hf_dir, torch_model = pair
  model = jblock.from_hf(hf_dir)
  ours = model.generate(PROMPTS, max_new_tokens=32)
  assert ours.shape == (3, 32)
  for row, prompt in enumerate(PROMPTS):
    _reset_dynamic_rope(torch_model)
    with torch.no_grad():
      ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False)[0, len(prompt):].numpy()
    assert ours[row].tolist() == ref.tolist(), name


# Models whose layers differ from each other (windows, RoPE per layer type, dense and MoE
# layers), where grouping layers into blocks could go wrong, plus one per block layout.
GROUPING = {"llama", "gpt2", "qwen2_sliding", "gemma2", "gemma3", "qwen2_moe", "mixtral"}


def test_layers_per_block_does_not_change_logits(pair):
  name, hf_dir, _ = pair
  if name not in GROUPING:
    pytest.skip("same layer structure as a model in GROUPING")
  one = jblock.from_hf(hf_dir, layers_per_block=1)
  two = jblock.from_hf(hf_dir, layers_per_block=2)
  assert len(two.blocks) == 2 + (one.config.num_layers + 1) // 2
  np.testing.assert_allclose(two.logits(PROMPTS[:1]), one.logits(PROMPTS[:1]), atol=1e-6, rtol=0)


def test_bfloat16_conversion_within_documented_tolerance(pair):
  name, hf_dir, torch_model = pair
  model = jblock.from_hf(hf_dir, dtype="bfloat16")
  assert str(model.dtype) == "bfloat16"
  ours = model.logits(PROMPTS[:1])[0]
  ref = _torch_logits(torch_model, PROMPTS[0])
  scale = np.abs(ref).max()
  if model.config.moe:
    # bfloat16 rounding can flip a near-tied expert choice (in transformers too): MoE models
    # are held to transformers run in bfloat16.
    ref = _torch_logits(copy.deepcopy(torch_model).to(torch.bfloat16), PROMPTS[0])
  assert np.abs(ours - ref).max() <= BF16_REL_TOL * scale, name


# A prompt of 3 full 4-token pages + 1, then a longer one sharing it, then the first again.
PREFIX_PROMPTS = [[5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12, 14, 8],
                  [5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12, 14, 8, 4, 90, 23, 6], None]
PREFIX_PROMPTS[2] = PREFIX_PROMPTS[0]


def test_prefix_caching_never_changes_greedy_tokens(pair):
  """The engine with prefix caching on gives every family the tokens it gives with it off
  (windowed and length-dependent-RoPE blocks do not cache; the others reuse the prefix)."""
  import dataclasses

  from jblock.convert import convert
  from jblock.runtime.engine import Engine, EngineConfig, ModelSpec

  name, hf_dir, _ = pair
  converted = convert(hf_dir)
  spec = ModelSpec(name, converted.config, converted.blocks)
  if converted.config.max_position_embeddings < 32:
    pytest.skip(f"{name} serves at most {converted.config.max_position_embeddings} tokens")
  config = EngineConfig(batch_size=2, kv_slots=2, page_size=4, max_seq_len=32, prefill_chunk=8,
                        length_buckets=(8,), warmup=False)
  out = {}
  for caching in (True, False):
    with Engine([spec], config=dataclasses.replace(config, enable_prefix_caching=caching),
                mesh_shape=(1, 1)) as engine:
      out[caching] = [engine.generate(name, p, max_new_tokens=8) for p in PREFIX_PROMPTS]
      hits = engine.stats()["prefix_cache"]["hit_tokens"]
    if caching:
      windowed = any(b.config.get("sliding_windows") and all(w > 0 for w in b.config["sliding_windows"])
                     for b in converted.blocks if b.kind == "layers")
      by_length = any(rope_lib.depends_on_length(b.config.get("rope"))
                      for b in converted.blocks if b.kind == "layers")
      assert hits == (0 if windowed or by_length else 24), name
  assert out[True] == out[False], name
