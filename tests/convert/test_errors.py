"""Bad checkpoints and unsupported configs fail with errors that name the problem."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jblock
from jblock.convert import convert
from jblock.errors import ConversionError, UnsupportedModelError
from tests import hf_models


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return hf_models.build("llama", str(tmp_path_factory.mktemp("llama")))[0]


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
  shutil.copytree(src, dst)
  if edit_tensors:
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit_tensors(tensors)
    save_file(tensors, path)
  if edit_config:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    edit_config(cfg)
    with open(path, "w") as f:
      json.dump(cfg, f)
  return str(dst)


def test_unsupported_architecture_names_supported_ones(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_config=lambda c: c.update(architectures=["FalconForCausalLM"]))
  with pytest.raises(UnsupportedModelError, match="FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
    jblock.from_hf(d)


def test_missing_tensor_is_named(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ConversionError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    convert(d)


def test_wrong_shape_is_named(llama_dir, tmp_path):
  def shrink(t):
    t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]
  d = _copy_with(llama_dir, tmp_path / "m", edit_tensors=shrink)
  with pytest.raises(ConversionError, match=r"model.layers.\{i\}.self_attn.k_proj.weight.*expected \(40, 20\)"):
    convert(d)


def test_nan_tensor_is_named(llama_dir, tmp_path):
  def poison(t):
    t["model.norm.weight"] = t["model.norm.weight"].copy()
    t["model.norm.weight"][3] = np.nan
  d = _copy_with(llama_dir, tmp_path / "m", edit_tensors=poison)
  with pytest.raises(ConversionError, match=r"'model.norm.weight' holds NaN"):
    convert(d)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m",
                 edit_tensors=lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ConversionError, match="model.extra.weight"):
    convert(d)


def test_truncated_file_is_an_error(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m")
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ConversionError, match="model.safetensors"):
    convert(d)


def test_sharded_checkpoint_converts_like_single_file(llama_dir, tmp_path):
  d = str(tmp_path / "sharded")
  os.makedirs(d)
  shutil.copy(os.path.join(llama_dir, "config.json"), d)
  tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(d, fname))
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: fname for fname, keys in shards.items() for k in keys}}, f)
  a, b = convert(llama_dir), convert(d)
  assert [x.id for x in a.blocks] == [x.id for x in b.blocks]


def test_unsupported_rope_and_dtype(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_config=lambda c: c.update(
      rope_parameters={"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}))
  with pytest.raises(UnsupportedModelError,
                     match="rope_type 'proportional'.*default, linear, llama3, yarn, dynamic, longrope"):
    convert(d)
  with pytest.raises(ConversionError, match="dtype must be one of float32, bfloat16"):
    convert(llama_dir, dtype="float16")


def test_not_a_checkpoint_dir(tmp_path):
  with pytest.raises(ConversionError, match="no config.json"):
    convert(str(tmp_path))


def test_multi_head_latent_attention_is_refused_naming_supported(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_config=lambda c: c.update(
      architectures=["DeepseekV3ForCausalLM"], kv_lora_rank=16, q_lora_rank=24))
  with pytest.raises(UnsupportedModelError,
                     match="DeepseekV3ForCausalLM.*latent attention.*Qwen3ForCausalLM.*"
                           "Gemma3ForCausalLM.*MixtralForCausalLM"):
    jblock.from_hf(d)


def test_partial_rotary_outside_phi3_is_refused(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_config=lambda c: c.update(
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
  with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5.*Phi3ForCausalLM"):
    convert(d)


def test_generation_config_eos_ids_are_all_kept(llama_dir, tmp_path):
  d = _copy_with(llama_dir, tmp_path / "m", edit_config=lambda c: c.update(eos_token_id=3))
  with open(os.path.join(d, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [3, 7, 11]}, f)
  assert convert(d).config.eos_token_ids == (3, 7, 11)
