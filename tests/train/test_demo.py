"""The offline demo: its tokenizer, and the demo zoo (base + partial fine-tunes)."""

import os

import numpy as np
import pytest

from jblock.train import demo

TEXTS = ["The sea is wide and old, and it keeps its own time.",
         "Unseen words too: quixotic zephyrs, Café naïve — 東京 😀\n\ttabs  and  spaces "]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  demo.save_tokenizer(demo.train_tokenizer(demo.corpus_text(), vocab_size=400), out)
  return out


def test_corpus_has_titled_sections():
  sections = demo.corpus_sections(demo.corpus_text())
  titles = [s.split("\n", 1)[0] for s in sections]
  assert titles == ["The Sea", "The Garden", "The Stars", "The Kitchen", "The Road", "The Winter"]
  assert all(len(s) > 500 for s in sections)
  assert "\n".join(sections) == demo.corpus_text()


def test_tokenizer_round_trips_text(tokenizer_dir):
  from tokenizers import Tokenizer
  from transformers import AutoTokenizer
  assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
  raw = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
  hf = AutoTokenizer.from_pretrained(tokenizer_dir)
  assert raw.get_vocab_size() == 400 and len(hf) == 400
  assert hf.eos_token == demo.EOS and hf.eos_token_id == raw.token_to_id(demo.EOS)
  for text in TEXTS:
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text
  corpus = demo.corpus_text()
  ids = raw.encode(corpus).ids
  assert raw.decode(ids) == corpus
  # Trained on the corpus: common words are whole tokens, far fewer tokens than bytes.
  assert len(ids) < len(corpus.encode()) / 2


TINY = demo.DemoSpec(hidden=32, layers=4, heads=4, kv_heads=2, vocab_size=300, pretrain_steps=6,
                     finetune_steps=3, batch_size=4, seq_len=16)


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
  out = {}
  for parent, _, files in os.walk(root):
    for f in files:
      st = os.stat(os.path.join(parent, f))
      out[os.path.relpath(os.path.join(parent, f), root)] = (st.st_size, st.st_mtime_ns)
  return out


def test_demo_zoo_builds_once(tmp_path):
  pytest.importorskip("jblock.zoo.store")
  from transformers import AutoTokenizer
  from jblock.zoo.store import Zoo
  zoo_dir = str(tmp_path / "zoo")
  assert not demo.demo_exists(zoo_dir, num_variants=2)
  messages = []
  added = demo.build_demo_zoo(zoo_dir, num_variants=2, progress=messages.append, spec=TINY)
  assert added == ["base", "variant-1", "variant-2"]
  assert demo.demo_exists(zoo_dir, num_variants=2)
  assert any("variant 2/2: loss" in m for m in messages)

  zoo = Zoo(zoo_dir)
  assert zoo.models() == ["base", "variant-1", "variant-2"]
  base = zoo.manifest("base")
  assert base["config"]["num_layers"] == 4 and base["config"]["hidden_size"] == 32
  for name in ("variant-1", "variant-2"):
    manifest = zoo.manifest(name)
    # Top 25% of 4 layers = the last layers block is the variant's own; the rest is shared.
    assert manifest["chain"][:4] == base["chain"][:4] and manifest["chain"][5] == base["chain"][5]
    assert manifest["chain"][4] != base["chain"][4]
    assert manifest["lineage"]["base_model"] == "base"
    assert manifest["lineage"]["trained_layers"] == [3]
  assert zoo.manifest("variant-1")["chain"][4] != zoo.manifest("variant-2")["chain"][4]
  assert zoo.manifest("variant-1")["lineage"]["data"] == "demo corpus sections: The Sea, The Garden, The Stars"

  tokenizer = AutoTokenizer.from_pretrained(zoo.tokenizer_dir("variant-1"))
  assert len(tokenizer) == base["config"]["vocab_size"] == 300
  assert base["config"]["eos_token_ids"] == [tokenizer.eos_token_id]
  model = zoo.load_model("variant-2")
  out = model.generate([tokenizer.encode("The sea")], max_new_tokens=4)
  assert out.shape == (1, 4) and np.all((out >= 0) & (out < 300))

  before = _snapshot(zoo_dir)
  messages.clear()
  assert demo.build_demo_zoo(zoo_dir, num_variants=2, progress=messages.append, spec=TINY) == []
  assert _snapshot(zoo_dir) == before
  assert messages == [f"demo zoo already present in {zoo_dir}"]
