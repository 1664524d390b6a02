"""Base models from init_base, fine-tuned variants from make_variants, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import jblock
from jblock.train import variants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = variants.BaseSpec(family="llama", hidden=32, layers=3, heads=4, kv_heads=2, vocab=61,
                          max_positions=64)
GPT2 = variants.BaseSpec(family="gpt2", hidden=24, layers=2, heads=3, vocab=53, max_positions=64)


def _tensors(model_dir: str) -> dict[str, np.ndarray]:
  return load_file(os.path.join(model_dir, "model.safetensors"))


def _bytes(model_dir: str) -> bytes:
  with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("llama_base"))
  # Wide init: logits of order 1, so the parity check below is not trivially met.
  variants.init_base(LLAMA, out, seed=3, init_std=0.2)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "marker": "copied"}, f)
  return out


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_init_base_loads_in_transformers_with_equal_logits(spec, tmp_path):
  import torch
  import transformers
  out = variants.init_base(spec, str(tmp_path), seed=1, init_std=0.2)
  reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reference).__name__ == variants.hf_config_for(spec)["architectures"][0]
  tokens = np.random.default_rng(0).integers(0, spec.vocab, size=(2, 9))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  got = jblock.from_hf(out).logits(tokens)
  assert expected.shape == (2, 9, spec.vocab)
  assert np.abs(expected).max() > 0.3  # a real signal, not near-zero logits
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_init_base_is_deterministic_per_seed(tmp_path):
  a = variants.init_base(LLAMA, str(tmp_path / "a"), seed=5)
  b = variants.init_base(LLAMA, str(tmp_path / "b"), seed=5)
  c = variants.init_base(LLAMA, str(tmp_path / "c"), seed=6)
  assert _bytes(a) == _bytes(b) != _bytes(c)


def test_partial_variants_train_only_the_top_layers(llama_base, tmp_path):
  k = 1
  dirs = variants.make_variants(llama_base, str(tmp_path), n=2, trainable_top_layers=k, steps=8,
                                seed=0, lr=1e-2, batch_size=4, seq_len=16, progress=None)
  assert dirs == [str(tmp_path / "variant_1"), str(tmp_path / "variant_2")]
  base = _tensors(llama_base)
  top = {f"model.layers.{i}." for i in range(LLAMA.layers - k, LLAMA.layers)}
  for d in dirs:
    tuned = _tensors(d)
    assert tuned.keys() == base.keys()
    changed = {name for name in base if not np.array_equal(base[name], tuned[name])}
    in_top = {name for name in base if any(name.startswith(p) for p in top)}
    assert changed == in_top  # every top-layer tensor moved, nothing else by a single bit
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    with open(os.path.join(d, variants.LINEAGE_FILE)) as f:
      lineage = json.load(f)
    assert lineage["base_hf_dir"] == os.path.abspath(llama_base)
    assert lineage["trained_layers"] == [2] and lineage["kind"] == "partial"
    assert lineage["trained_blocks"] == ["layers.2"]
    assert lineage["steps"] == 8 and lineage["seed"] == int(os.path.basename(d)[-1])
    assert lineage["loss_end"] < lineage["loss_start"]
    with open(os.path.join(d, "tokenizer_config.json")) as f:
      assert json.load(f)["marker"] == "copied"
  # Distinct data per variant: the two fine-tunes differ from each other too.
  assert _bytes(dirs[0]) != _bytes(dirs[1])
  # Variants are HF checkpoints jblock converts, sharing the frozen blocks with the base by id.
  base_ids = [b.id for b in jblock.from_hf(llama_base).blocks]
  tuned_ids = [b.id for b in jblock.from_hf(dirs[0]).blocks]
  assert tuned_ids[:-2] == base_ids[:-2] and tuned_ids[-1] == base_ids[-1]
  assert tuned_ids[-2] != base_ids[-2]


def test_same_seed_gives_identical_bytes(llama_base, tmp_path):
  kwargs = dict(n=1, trainable_top_layers=2, steps=3, batch_size=2, seq_len=8, progress=None)
  a = variants.make_variants(llama_base, str(tmp_path / "a"), seed=7, **kwargs)[0]
  b = variants.make_variants(llama_base, str(tmp_path / "b"), seed=7, **kwargs)[0]
  c = variants.make_variants(llama_base, str(tmp_path / "c"), seed=8, **kwargs)[0]
  assert _bytes(a) == _bytes(b)
  assert _bytes(a) != _bytes(c)


def test_full_fine_tune_changes_every_tensor(tmp_path):
  base_dir = variants.init_base(GPT2, str(tmp_path / "base"), seed=0)  # tied embeddings
  corpus = np.arange(200) % GPT2.vocab
  out = variants.make_variants(base_dir, str(tmp_path / "out"), n=1, steps=3, seed=0, full=True,
                               data=corpus, batch_size=2, seq_len=8, progress=None)[0]
  base, tuned = _tensors(base_dir), _tensors(out)
  assert tuned.keys() == base.keys()
  assert [n for n in base if np.array_equal(base[n], tuned[n])] == []
  with open(os.path.join(out, variants.LINEAGE_FILE)) as f:
    lineage = json.load(f)
  assert lineage["kind"] == "full" and lineage["trained_layers"] == [0, 1]
  assert lineage["trained_blocks"] == ["embed", "layers.0", "layers.1", "head"]
  assert lineage["data"] == "corpus part 1 of 1"
  # The tied head still reads the (now trained) embedding: the variant converts and runs.
  model = jblock.from_hf(out)
  assert model.blocks[-1].config["tied_to"] == model.blocks[0].id


def test_make_variants_rejects_bad_arguments(llama_base, tmp_path):
  with pytest.raises(ValueError, match="trainable_top_layers must be in \\[1, 3\\]"):
    variants.make_variants(llama_base, str(tmp_path), n=1, trainable_top_layers=4, steps=1,
                           progress=None)
  with pytest.raises(ValueError, match="n must be >= 1"):
    variants.make_variants(llama_base, str(tmp_path), n=0, progress=None)
  with pytest.raises(ValueError, match="each in \\[0, 61\\)"):
    variants.make_variants(llama_base, str(tmp_path), n=1, data=[0, 1, 61], progress=None)


def test_variant_streams_are_distinct_per_variant():
  synthetic, names = variants.variant_streams(None, 3, vocab=50, seed=0)
  assert len(synthetic) == 3 and len(set(names)) == 3
  assert all(s.max() < 50 for s in synthetic)
  assert not np.array_equal(synthetic[0][:48], synthetic[1][:48])
  split, names = variants.variant_streams(np.arange(10), 2, vocab=50, seed=0)
  assert [s.tolist() for s in split] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
  assert names == ["corpus part 1 of 2", "corpus part 2 of 2"]
  given, _ = variants.variant_streams([[1, 2], [3, 4, 5]], 2, vocab=50, seed=0)
  assert [s.tolist() for s in given] == [[1, 2], [3, 4, 5]]


def test_parse_init_config():
  spec = variants.parse_init_config("family:gpt2,hidden:48,layers:2,heads:4,vocab:99,tie:true")
  assert spec == variants.BaseSpec(family="gpt2", hidden=48, layers=2, heads=4, vocab=99, tie=True)
  for bad, message in [("hiden:4", "bad item 'hiden:4'"), ("layers:two", "layers: expected int"),
                       ("family:bert", "family must be one of"),
                       ("hidden:30,heads:4", "not a multiple of heads"),
                       ("heads:4,kv_heads:3", "kv_heads=3 must divide")]:
    with pytest.raises(ValueError, match=message):
      variants.parse_init_config(bad)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tools.make_variants", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_bad_flags_with_one_line():
  for args, flag in [(["--bogus=1"], "bogus"), (["--n=many"], "--n"),
                     (["--out_dir=/tmp/x", "--init_config=family:llama,hiden:4"], "--init_config"),
                     (["--out_dir=/tmp/x", "--init_config=layers:2", "--trainable_top_layers=3"],
                      "--trainable_top_layers")]:
    result = _cli(*args)
    lines = [l for l in result.stderr.splitlines() if "make_variants: error" in l]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and flag in lines[0], result.stderr


def test_cli_makes_base_and_variants(tmp_path):
  result = _cli(f"--out_dir={tmp_path}", "--n=2", "--steps=2", "--seed=1", "--batch_size=2",
                "--seq_len=8", "--init_config=family:llama,hidden:16,layers:2,heads:2,vocab:31")
  assert result.returncode == 0, result.stderr
  assert "variant 2/2: loss" in result.stdout
  base = _tensors(str(tmp_path / "base"))
  for i in (1, 2):
    tuned = _tensors(str(tmp_path / f"variant_{i}"))
    assert np.array_equal(tuned["model.layers.0.mlp.up_proj.weight"],
                          base["model.layers.0.mlp.up_proj.weight"])
    assert not np.array_equal(tuned["model.layers.1.mlp.up_proj.weight"],
                              base["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("family", ["gemma2", "phi3", "mixtral"])
def test_newer_families_make_variants_that_transformers_loads(family, tmp_path):
  # gemma2: (1 + w) norms start at w = 0; phi3: fused tensors re-fused on export; mixtral:
  # per-expert tensors written back one by one.
  import torch
  import transformers
  spec = variants.BaseSpec(family=family, hidden=32, layers=2, heads=4, kv_heads=2, vocab=61,
                           max_positions=64)
  base = variants.init_base(spec, str(tmp_path / "base"), seed=0, init_std=0.2)
  ft = variants.make_variants(base, str(tmp_path), n=1, trainable_top_layers=1, steps=2,
                              seq_len=8, batch_size=2, progress=None)[0]
  a, b = jblock.from_hf(base), jblock.from_hf(ft)
  assert [x.id == y.id for x, y in zip(a.blocks, b.blocks)] == [True, True, False, True]
  extra = {"experts_implementation": "eager"} if family == "mixtral" else {}
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32,
                                                                  **extra).eval()
  prompt = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]
  with torch.no_grad():
    ref = torch_model(torch.tensor([prompt])).logits[0].numpy()
  np.testing.assert_allclose(b.logits([prompt])[0], ref, atol=1e-4, rtol=0)
