"""An adapter is a model name over gRPC too: ListModels, Generate, Admin UnloadModel/LoadModel."""

import torch
import transformers

from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.lora_adapters import make_adapter

PROMPT = [5, 17, 3, 88, 42, 7]
CONFIG = EngineConfig(batch_size=4, kv_slots=8, max_seq_len=32, prefill_chunk=16,
                      length_buckets=(16,), warmup=False, lora_slots=2, lora_max_rank=8)


def test_adapter_over_grpc(tmp_path, serve):
  base, _ = hf_models.build("llama", str(tmp_path / "base"))
  merged = str(tmp_path / "merged")
  make_adapter(base, str(tmp_path / "peft"), targets=["q_proj", "v_proj", "down_proj"], r=4,
               alpha=8, std=0.3, merged_dir=merged)
  zoo = Zoo(str(tmp_path / "zoo"))
  zoo.convert(base, "base")
  zoo.convert_peft(str(tmp_path / "peft"), "base", "my-adapter")
  expected = {}
  for name, d in (("base", base), ("my-adapter", merged)):
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
      out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False)
    expected[name] = out[0, len(PROMPT):].tolist()
  assert expected["base"] != expected["my-adapter"]
  engine = Engine.from_zoo(zoo.root, models=["base", "my-adapter"], mesh_shape=(1, 1),
                           config=CONFIG)
  client, _, _ = serve(engine)
  assert {m.name: m.base_model for m in client.list_models()} == {"base": "", "my-adapter": "base"}
  for name in ("base", "my-adapter"):
    assert client.generate_tokens(name, prompt_tokens=PROMPT, max_tokens=6) == expected[name]
  client.unload_model("my-adapter")
  assert {m.name for m in client.list_models()} == {"base"}
  assert engine.stats()["adapters"]["registered"] == []
  client.load_model("my-adapter")
  assert client.generate_tokens("my-adapter", prompt_tokens=PROMPT, max_tokens=6) == \
      expected["my-adapter"]
