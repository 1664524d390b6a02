"""Length-dependent RoPE (dynamic NTK, LongRoPE) takes the length transformers takes.

A prompt's every prefill chunk uses the whole prompt's length, and a Phi-3 LongRoPE generation
that crosses `original_max_position_embeddings` runs its whole sequence again with the long
factors, as transformers' Phi-3 `generate` does: logits and greedy tokens equal across the
crossing, through Model.generate and through the engine with chunked prompts.
"""

import numpy as np
import pytest
import torch

import jblock
from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo import Zoo
from tests import hf_models

ORIGINAL = 8  # original_max_position_embeddings of phi3_longrope_crossing
NEW = 10
CROSSING = [[5, 17, 3, 88, 41], [13, 7, 96, 4, 50, 22, 61, 30]]  # 5 and 8 tokens: they cross
LONG = [[int(t) for t in np.random.default_rng(1).integers(0, 97, 13)]]  # past 8 from the start
# Prompts of 13 tokens go in chunks of 4: chunks that end before the original length.
CONFIG = EngineConfig(batch_size=4, kv_slots=4, max_seq_len=32, prefill_chunk=4,
                      length_buckets=(4,), warmup=False)
MODELS = ("phi3_longrope_crossing",)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("rope_lengths")
  zoo = Zoo(str(root / "zoo"))
  out = {}
  for name in MODELS:
    hf_dir, torch_model = hf_models.build(name, str(root / name))
    zoo.convert(hf_dir, name)
    out[name] = (hf_dir, torch_model)
  return zoo, out


def _reference(torch_model, prompt):
  """transformers' greedy tokens and per-step logits (fresh dynamic RoPE state)."""
  for module in torch_model.modules():
    if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
      module.inv_freq = module.original_inv_freq.clone()
      module.max_seq_len_cached = module.original_max_seq_len
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, return_dict_in_generate=True, output_logits=True)
  tokens = out.sequences[0, len(prompt):].tolist()
  return tokens, np.stack([step[0].float().numpy() for step in out.logits])


def test_longrope_generation_crossing_the_original_length(built):
  zoo, models = built
  hf_dir, torch_model = models["phi3_longrope_crossing"]
  model = jblock.from_zoo(zoo.root, "phi3_longrope_crossing")
  ours = model.generate(CROSSING, max_new_tokens=NEW)
  for row, prompt in enumerate(CROSSING):
    tokens, logits = _reference(torch_model, prompt)
    assert ours[row].tolist() == tokens
    # The logits of the steps around the crossing: the whole sequence so far at once (short
    # factors up to 8 tokens, then long ones everywhere: what transformers' re-run computes).
    seq = prompt + tokens
    for step in range(NEW):
      length = len(prompt) + step
      if not ORIGINAL - 1 <= length <= ORIGINAL + 2:
        continue
      ours_step = model.logits([seq[:length]])[0, -1]
      np.testing.assert_allclose(ours_step, logits[step], atol=1e-4, rtol=0,
                                 err_msg=f"row {row} step {step} (length {length})")


def test_engine_chunked_prompts_and_crossing_equal_transformers(built):
  zoo, models = built
  engine = Engine.from_zoo(zoo.root, MODELS, config=CONFIG)
  try:
    cases = [("phi3_longrope_crossing", p) for p in CROSSING + LONG]
    handles = [engine.submit(name, prompt, max_new_tokens=NEW, temperature=0.0)
               for name, prompt in cases]
    got = [h.result(timeout=300) for h in handles]
  finally:
    engine.close()
  for (name, prompt), tokens in zip(cases, got):
    assert tokens == _reference(models[name][1], prompt)[0], (name, len(prompt))
