"""Full fine-tunes from the command line: `tools.convert --delta_base` stores compressed delta
blocks, `tools.zoo show/verify/gc` handle them, and `tools.zoo export` writes a checkpoint whose
transformers logits equal the logits jblock serves (base + bank delta) within 1e-4; bad input
gets a one-line error naming the flag, model or tensor, and leaves the zoo as it was."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jblock.blocks import LAYERS
from jblock.convert.full_delta import single_bank
from jblock.errors import ConversionError
from jblock.models.attention import contiguous_meta
from jblock.models import blocks as block_fns
from jblock.models.reference import runtime_params
from jblock.zoo import assemble as asm
from jblock.zoo.full_deltas import DeltaOptions, convert_full_delta
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.zoo.test_cli import _one_line_error, _run

TOKENS = [[5, 17, 3, 88, 41, 2, 9, 60], [13, 7, 96, 4, 0, 31, 77, 90]]


def served_logits(zoo: Zoo, name: str, tokens) -> np.ndarray:
  """float32 logits of a compressed fine-tune as jblock serves it: the base's blocks, each
  qdelta applied per row from the bank (jblock.models.deltas), never materialised."""
  m = zoo.manifest(name)
  chain = [zoo.load_block(i) for i in m["chain"]]
  x = jnp.asarray(tokens, jnp.int32)
  b, t = x.shape
  meta = contiguous_meta(b, t, 0, t)
  for i, (block, delta_id) in enumerate(zip(chain, m["deltas"])):
    kv = block_fns.init_kv(block.config, b, t, jnp.float32) if block.kind == LAYERS else {}
    step_meta = dict(meta)
    if delta_id:
      step_meta.update(lora=single_bank(zoo.load_block(delta_id)),
                       adapter=jnp.zeros(b, jnp.int32))
    x, _ = block_fns.apply_fn(block.kind, block.config)(runtime_params(chain, i), kv, x,
                                                          step_meta)
  return np.asarray(x)


@pytest.fixture(scope="module")
def delta_zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("full_delta_cli")
  base, _ = hf_models.build("llama", str(root / "base"))
  with open(os.path.join(base, "tokenizer_config.json"), "w") as f:  # copied whatever it holds
    json.dump({"model_max_length": 128}, f)
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  ft = hf_models.full_finetune(base, str(root / "ft"), std=0.05, seed=3)
  calibration = str(root / "calibration.npy")
  np.save(calibration, np.random.default_rng(0).integers(0, 97, 768))
  return root, zoo, ft, calibration


def _snapshot(zoo: Zoo):
  return sorted(zoo.block_ids()), sorted(zoo.models())


def test_convert_show_verify_gc_and_export_round_trip(delta_zoo):
  root, zoo, ft, calibration = delta_zoo
  convert = _run("tools.convert", f"--hf_dir={ft}", "--name=ft8", "--delta_base=base",
                 "--delta=int8", f"--calibration={calibration}", f"--zoo={zoo.root}")
  assert convert.returncode == 0, convert.stderr
  m = zoo.manifest("ft8")
  n_blocks = len(m["chain"])
  assert all(m["deltas"])
  assert f"{n_blocks} compressed delta blocks" in convert.stdout
  # Every block (embed and head too: the model is untied) serves through the base's ids.
  assert m["chain"] == zoo.manifest("base")["chain"]
  assert m["adapter"] == {"base_model": "base", "peft_type": "DELTA", "method": "int8"}
  held = m["full_delta"]["losses"]["held_out"]
  assert held["top1"] >= 0.98 and held["kl"] < 1e-3, held
  # The qdelta blocks are a small fraction of the blocks they stand for.
  assert sum(m["delta_bytes"]) < 0.35 * sum(m["block_bytes"])

  show = _run("tools.zoo", "show", "ft8", f"--zoo={zoo.root}")
  assert show.returncode == 0, show.stderr
  assert "deltas over base (DELTA, int8):" in show.stdout
  assert show.stdout.count(" qdelta int8 ") == n_blocks
  assert f"held_out: KL {held['kl']:.5f}, top-1 {held['top1']:.4f}" in show.stdout

  verify = _run("tools.zoo", "verify", f"--zoo={zoo.root}")
  assert verify.returncode == 0 and "0 problems" in verify.stdout, verify.stdout
  gc = _run("tools.zoo", "gc", f"--zoo={zoo.root}")
  assert gc.returncode == 0 and "removed 0 unreferenced blocks" in gc.stdout, gc.stdout
  assert all(zoo.has_block(d) for d in m["deltas"] if d)

  out = str(root / "ft8.hf")
  export = _run("tools.zoo", "export", "ft8", f"--out={out}", f"--zoo={zoo.root}")
  assert export.returncode == 0, export.stderr
  assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(out))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    exported = hf(torch.tensor(TOKENS)).logits.numpy()
  served = served_logits(zoo, "ft8", TOKENS)
  np.testing.assert_allclose(served, exported, atol=1e-4, rtol=0)
  assert (served.argmax(-1) == exported.argmax(-1)).all()  # the same greedy tokens
  # An existing non-empty directory is refused, not overwritten.
  again = _run("tools.zoo", "export", "ft8", f"--out={out}", f"--zoo={zoo.root}")
  _one_line_error(again, "--out=", "not empty")


def test_tied_model_keeps_embed_and_head_whole(tmp_path):
  """A head that reads the embed's table gets no per-row delta of it: both stay whole, and the
  layers still serve from the bank."""
  base, _ = hf_models.build("llama_tied_mha", str(tmp_path / "base"))
  zoo = Zoo(str(tmp_path / "zoo"))
  zoo.convert(base, "base")
  ft = hf_models.full_finetune(base, str(tmp_path / "ft"), std=0.05, seed=3)
  calibration = str(tmp_path / "calibration.npy")
  np.save(calibration, np.random.default_rng(0).integers(0, 97, 256))
  convert_full_delta(zoo, ft, "base", "tied", DeltaOptions(method="int8", calibration=calibration))
  m, base_chain = zoo.manifest("tied"), zoo.manifest("base")["chain"]
  assert m["deltas"][0] is None and m["deltas"][-1] is None and all(m["deltas"][1:-1])
  assert m["chain"][1:-1] == base_chain[1:-1]
  assert m["chain"][0] != base_chain[0] and m["chain"][-1] != base_chain[-1]
  assert m["full_delta"]["encodings"]["0"] == "whole"
  tokens = [TOKENS[0]]
  hf = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
  with torch.no_grad():
    original = hf(torch.tensor(tokens)).logits.numpy()
  assert (served_logits(zoo, "tied", tokens).argmax(-1) == original.argmax(-1)).mean() >= 0.75


def test_bad_inputs_name_the_flag_model_or_tensor(delta_zoo):
  root, zoo, ft, calibration = delta_zoo
  before = _snapshot(zoo)
  _one_line_error(_run("tools.convert", f"--hf_dir={ft}", "--name=x", "--delta_base=nobase",
                       f"--zoo={zoo.root}"), "--delta_base=nobase", "no such model")
  _one_line_error(_run("tools.convert", f"--hf_dir={ft}", "--name=x", "--delta_base=base",
                       f"--calibration={root}/missing.txt", f"--zoo={zoo.root}"),
                  "--calibration=", "no such file")
  _one_line_error(_run("tools.convert", f"--hf_dir={ft}", "--name=x", "--delta_base=base",
                       "--delta=int3", f"--zoo={zoo.root}"), "--delta", "bitdelta")
  # A fine-tune of another shape: the error names the block and the config key.
  cls_name, kwargs = hf_models.CONFIGS["llama"]
  other = str(root / "other")
  torch.manual_seed(1)
  transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(
      **dict(kwargs, intermediate_size=kwargs["intermediate_size"] + 8))).eval().save_pretrained(other)
  with pytest.raises(ConversionError, match="block 1 .layers.: config differs from the base.s in intermediate_size"):
    convert_full_delta(zoo, other, "base", "x", DeltaOptions(method="int8",
                                                             calibration=calibration))
  assert _snapshot(zoo) == before


def test_assembly_weighs_compressed_deltas_like_adapter_deltas(delta_zoo):
  """Equivalence assembly over a compressed fine-tune: a position may serve the base block
  without its compressed delta, saving the delta's bytes, when the measured loss (with the
  deltas applied from a one-slot bank, as served) stays within the budget; a budget no drop fits
  keeps every delta."""
  root, zoo, ft, calibration = delta_zoo
  convert_full_delta(zoo, ft, "base", "ft4", DeltaOptions(method="int4", calibration=calibration))
  m = zoo.manifest("ft4")
  tokens = np.load(calibration)
  opts = dict(seq_len=32, max_windows=12, holdout=0.25, calibration=tokens)
  kept = asm.assemble(zoo, "ft4", "ft4-same", min_top1=0.999, max_kl=1e-6, **opts)
  assert kept["substitutions"] == [] and zoo.manifest("ft4-same")["deltas"] == m["deltas"]
  plain = asm.assemble(zoo, "ft4", "ft4-plain", min_top1=0.0, **opts)
  assert sorted(s["position"] for s in plain["substitutions"]) == list(range(len(m["chain"])))
  assert all(s["dropped_delta"] == m["deltas"][s["position"]] for s in plain["substitutions"])
  assert plain["bytes_saved"] == sum(m["delta_bytes"])
  out = zoo.manifest("ft4-plain")
  assert out["chain"] == zoo.manifest("base")["chain"] and "deltas" not in out
  # The measured loss is the compressed model's distance from the base: the fine-tune's change.
  assert plain["holdout"]["top1"] < 1.0
