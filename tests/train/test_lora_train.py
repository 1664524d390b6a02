"""LoRA adapters trained with real Adam steps (jblock.train.lora_train) are valid PEFT adapters:
the loss drops, and the converted adapter's logits match transformers on the merged weights."""

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jblock.train.lora_train import make_lora_variants
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.convert.test_peft import TOKENS, adapter_logits


def test_trained_lora_adapters_convert_and_match_merged(tmp_path):
  base, _ = hf_models.build("llama", str(tmp_path / "base"))
  dirs = make_lora_variants(base, str(tmp_path / "loras"), n=2, targets=["q_proj", "v_proj",
                            "down_proj"], ranks=(4, 8), steps=12, lr=2e-2, progress=None)
  zoo = Zoo(str(tmp_path / "zoo"))
  zoo.convert(base, "base")
  import json
  for i, d in enumerate(dirs):
    with open(f"{d}/lineage.json") as f:
      lineage = json.load(f)
    assert lineage["loss_end"] < lineage["loss_start"]
    zoo.convert_peft(d, "base", f"lora-{i}")
    tensors = load_file(f"{d}/adapter_model.safetensors")
    with open(f"{d}/adapter_config.json") as f:
      cfg = json.load(f)
    merged = load_file(f"{base}/model.safetensors")
    for name, a in tensors.items():
      if name.endswith("lora_A.weight"):
        module = name[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[name.replace("lora_A", "lora_B")]
        assert np.abs(b).max() > 0  # trained, not PEFT's zero init
        merged[f"{module}.weight"] = merged[f"{module}.weight"] + cfg["lora_alpha"] / cfg["r"] * (b @ a)
    merged_dir = tmp_path / f"merged{i}"
    import shutil
    shutil.copytree(base, merged_dir)
    save_file(merged, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    with torch.no_grad():
      ref = model.eval()(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(adapter_logits(zoo, f"lora-{i}", TOKENS) - ref).max() < 1e-4
