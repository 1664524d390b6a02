"""Fixtures: a tiny Llama base, partial fine-tunes of it, and a zoo holding all of them."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jblock.zoo import Zoo
from tests import hf_models

NUM_LAYERS = 3  # hf_models.BASE
NUM_VARIANTS = 2
TRAINED_TOP = 2  # layers each variant changes, counted from the top
PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [13, 7, 96, 4], [90, 1, 45]]


def make_variant(base_dir: str, out_dir: str, layers, seed: int,
                 prefix: str = "model.layers") -> str:
  """A partial fine-tune: the base's checkpoint with only `layers` perturbed."""
  shutil.copytree(base_dir, out_dir)
  path = os.path.join(out_dir, "model.safetensors")
  tensors = load_file(path)
  rng = np.random.default_rng(seed)
  for name, tensor in tensors.items():
    if any(name.startswith(f"{prefix}.{i}.") for i in layers):
      tensors[name] = (tensor + rng.normal(0, 0.02, tensor.shape)).astype(tensor.dtype)
  save_file(tensors, path, metadata={"format": "pt"})
  return out_dir


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
  out, _ = hf_models.build("llama", str(tmp_path_factory.mktemp("hf") / "base"))
  # A stand-in tokenizer file: the zoo copies tokenizer files whatever their content.
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 128}, f)
  return out


@pytest.fixture(scope="session")
def variant_dirs(base_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("variants")
  top = range(NUM_LAYERS - TRAINED_TOP, NUM_LAYERS)
  return [make_variant(base_dir, str(root / f"v{n}"), top, seed=n + 1)
          for n in range(1, NUM_VARIANTS + 1)]


@pytest.fixture(scope="session")
def zoo_reports(base_dir, variant_dirs, tmp_path_factory):
  """A zoo with 'base' and 'ft-1'..'ft-N' (k=1). Tests that change a zoo work on a copy."""
  zoo = Zoo(str(tmp_path_factory.mktemp("zoo") / "zoo"))
  reports = [zoo.convert(base_dir, "base")]
  reports += [zoo.convert(d, f"ft-{n}", lineage={"base_model": "base"})
              for n, d in enumerate(variant_dirs, 1)]
  return zoo, reports


@pytest.fixture
def zoo_copy(zoo_reports, tmp_path):
  zoo, _ = zoo_reports
  shutil.copytree(zoo.root, tmp_path / "zoo")
  return Zoo(str(tmp_path / "zoo"))
