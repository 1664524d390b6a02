"""PEFT LoRA adapters convert into delta blocks whose logits match transformers on the merged
weights (W + scale * B @ A) and transformers + peft itself, for several ranks, targets, alphas,
rsLoRA and modules_to_save; malformed adapters are refused naming the tensor or module."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jblock.blocks import LAYERS
from jblock.errors import ConversionError, UnsupportedModelError
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta
from jblock.models.lora import single_bank
from jblock.models.reference import runtime_params
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.lora_adapters import make_adapter

TOKENS = [[5, 17, 3, 88, 42, 7, 61, 9, 30, 2, 71]]
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all_r4": dict(targets=ALL_LLAMA, r=4, alpha=8),
    "qv_rslora_r8": dict(targets=["q_proj", "v_proj"], r=8, alpha=16, rslora=True, seed=1),
    "patterns": dict(targets=ALL_LLAMA, r=4, alpha=8, seed=2,
                     rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                     alpha_pattern={"o_proj": 3}),
    "layers_lm_head": dict(targets=["up_proj"], r=3, alpha=5, layers=[0, 2], seed=3,
                           modules_to_save=["lm_head"]),
}


def adapter_logits(zoo: Zoo, name: str, tokens) -> np.ndarray:
  """float32 logits of a zoo model, its delta blocks applied from one-slot banks."""
  m = zoo.manifest(name)
  chain = [zoo.load_block(i) for i in m["chain"]]
  deltas = [zoo.load_block(d) if d else None for d in m.get("deltas") or [None] * len(chain)]
  x = jnp.asarray(tokens, jnp.int32)
  b, t = x.shape
  meta = contiguous_meta(b, t, 0, t)
  for i, (block, delta) in enumerate(zip(chain, deltas)):
    kv = block_fns.init_kv(block.config, b, t, jnp.float32) if block.kind == LAYERS else {}
    step_meta = dict(meta)
    if delta is not None:
      step_meta.update(lora=single_bank(delta), adapter=jnp.zeros(b, jnp.int32))
    params = {k: v for k, v in runtime_params(chain, i).items()}
    x, _ = block_fns.apply_fn(block.kind, block.config)(params, kv, x, step_meta)
  return np.asarray(x)


def torch_logits(hf_dir: str, tokens) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("peft")
  base, _ = hf_models.build("llama", str(root / "base"))
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  return root, base, zoo


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_llama_adapter_logits_match_merged_transformers(llama, name):
  root, base, zoo = llama
  peft_dir, merged = str(root / f"{name}.peft"), str(root / f"{name}.merged")
  make_adapter(base, peft_dir, merged_dir=merged, **ADAPTERS[name])
  report = zoo.convert_peft(peft_dir, "base", name)
  m = zoo.manifest(name)
  base_chain = zoo.manifest("base")["chain"]
  assert m["adapter"]["base_model"] == "base"
  n_delta = sum(d is not None for d in m["deltas"])
  layers = ADAPTERS[name].get("layers")
  assert n_delta == (len(layers) if layers else 3)
  for d, base_id in zip(m["deltas"], base_chain):
    if d:
      assert zoo.block_record(d)["config"]["base"] == base_id
  # Only the head differs when lm_head is retrained; every other base block is shared.
  differ = [i for i, (a, b) in enumerate(zip(m["chain"], base_chain)) if a != b]
  assert differ == ([len(base_chain) - 1] if "lm_head" in name else [])
  ref = torch_logits(merged, TOKENS)
  got = adapter_logits(zoo, name, TOKENS)
  delta = float(np.abs(got - ref).max())
  print(f"{name}: max |dlogit| = {delta:.2e}")
  assert delta < 1e-4
  # The base's own logits differ (the adapter does something) ...
  assert np.abs(torch_logits(base, TOKENS) - ref).max() > 1e-2
  # ... and converting the same adapter again writes nothing.
  again = zoo.convert_peft(peft_dir, "base", name)
  assert again.written == [] and not again.manifest_written and report.written


def test_gpt2_adapter_fused_c_attn(tmp_path):
  base, _ = hf_models.build("gpt2", str(tmp_path / "base"))
  zoo = Zoo(str(tmp_path / "zoo"))
  zoo.convert(base, "gpt2")
  peft_dir, merged = str(tmp_path / "a.peft"), str(tmp_path / "a.merged")
  make_adapter(base, peft_dir, targets=["c_attn", "c_proj", "c_fc"], r=4, alpha=12,
               merged_dir=merged)
  zoo.convert_peft(peft_dir, "gpt2", "gpt2-lora")
  delta = float(np.abs(adapter_logits(zoo, "gpt2-lora", TOKENS) - torch_logits(merged, TOKENS)).max())
  print(f"gpt2 c_attn/c_proj/c_fc: max |dlogit| = {delta:.2e}")
  assert delta < 1e-4
  record = zoo.block_record(zoo.manifest("gpt2-lora")["deltas"][1])
  assert set(record["config"]["targets"]) == {f"layer_0/{p}" for p in (
      "attn/q", "attn/k", "attn/v", "attn/o", "mlp/fc", "mlp/proj")}


def peft_logits(base_dir: str, peft_dir: str, tokens) -> np.ndarray:
  """float32 logits of transformers + peft itself: the base with the adapter loaded (unmerged)."""
  import peft
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, peft_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", ["patterns", "qv_rslora_r8"])
def test_llama_adapter_logits_match_peft(llama, name):
  root, base, zoo = llama
  peft_dir = make_adapter(base, str(root / f"{name}.vs_peft"), **ADAPTERS[name])
  zoo.convert_peft(peft_dir, "base", f"{name}-vs-peft")
  ref = peft_logits(base, peft_dir, TOKENS)
  assert np.abs(torch_logits(base, TOKENS) - ref).max() > 1e-2  # peft applied the adapter
  delta = float(np.abs(adapter_logits(zoo, f"{name}-vs-peft", TOKENS) - ref).max())
  print(f"{name} vs peft: max |dlogit| = {delta:.2e}")
  assert delta < 1e-4


def test_gpt2_adapter_logits_match_peft(tmp_path):
  base, _ = hf_models.build("gpt2", str(tmp_path / "base"))
  zoo = Zoo(str(tmp_path / "zoo"))
  zoo.convert(base, "gpt2")
  peft_dir = make_adapter(base, str(tmp_path / "a.peft"), targets=["c_attn", "c_proj", "c_fc"],
                          r=6, alpha=9, rslora=True, seed=4)
  zoo.convert_peft(peft_dir, "gpt2", "gpt2-lora")
  ref = peft_logits(base, peft_dir, TOKENS)
  assert np.abs(torch_logits(base, TOKENS) - ref).max() > 1e-2
  delta = float(np.abs(adapter_logits(zoo, "gpt2-lora", TOKENS) - ref).max())
  print(f"gpt2 vs peft: max |dlogit| = {delta:.2e}")
  assert delta < 1e-4


def _rewrite(peft_dir, config=None, drop=(), reshape=None, add=None):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(peft_dir, "adapter_model.safetensors")
  tensors = load_file(path)
  for n in drop:
    del tensors[n]
  if reshape:
    tensors[reshape] = np.zeros((tensors[reshape].shape[0], 3), np.float32)
  tensors.update(add or {})
  save_file(tensors, path)
  if config:
    cfg_path = os.path.join(peft_dir, "adapter_config.json")
    with open(cfg_path) as f:
      cfg = json.load(f)
    cfg.update(config)
    with open(cfg_path, "w") as f:
      json.dump(cfg, f)


def test_malformed_adapters_are_refused_naming_the_culprit(llama, tmp_path):
  root, base, zoo = llama
  q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
  cases = [
      (dict(drop=[q_a]), ConversionError, "model.layers.1.self_attn.q_proj.lora_A.weight"),
      (dict(reshape=q_a), ConversionError, "model.layers.1.self_attn.q_proj"),
      (dict(config={"target_modules": ["q_proj", "qkv"]}), ConversionError, "'qkv'"),
      (dict(add={"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight":
                 np.zeros((4, 40), np.float32)}), ConversionError, "gate_proj.lora_A"),
      (dict(config={"use_dora": True}), UnsupportedModelError, "DoRA"),
      (dict(config={"peft_type": "IA3"}), UnsupportedModelError, "IA3"),
      (dict(config={"bias": "all"}), UnsupportedModelError, "bias"),
  ]
  for i, (change, error, text) in enumerate(cases):
    d = make_adapter(base, str(tmp_path / f"bad{i}"), targets=["q_proj"], r=4)
    _rewrite(d, **change)
    with pytest.raises(error, match=text.replace(".", r"\.").replace("(", r"\(")):
      zoo.convert_peft(d, "base", f"bad{i}")
  # An adapter for another architecture (GPT-2 modules) does not fit this base.
  gpt2, _ = hf_models.build("gpt2", str(tmp_path / "gpt2"))
  d = make_adapter(gpt2, str(tmp_path / "gpt2.peft"), targets=["c_attn"], r=4)
  with pytest.raises(ConversionError, match="c_attn"):
    zoo.convert_peft(d, "base", "wrong-base")
  assert not any(n.startswith("bad") or n == "wrong-base" for n in zoo.models())


def test_tools_convert_peft_dir(llama):
  import subprocess
  import sys
  root, base, zoo = llama
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  peft_dir = make_adapter(base, str(root / "cli.peft"), targets=["q_proj", "down_proj"], r=2)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": repo}
  run = lambda *a: subprocess.run([sys.executable, "-m", "tools.convert", *a], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=120)
  ok = run(f"--peft_dir={peft_dir}", "--base=base", "--name=cli-lora", f"--zoo={zoo.root}")
  assert ok.returncode == 0, ok.stderr
  assert "adapter over base: 3 delta blocks" in ok.stdout
  assert zoo.manifest("cli-lora")["adapter"]["modules"]
  bad = run(f"--peft_dir={peft_dir}", "--name=x", f"--zoo={zoo.root}")
  assert bad.returncode != 0 and "--base" in bad.stderr and "Traceback" not in bad.stderr
