"""Gemma's BOS: a text prompt reaches the engine starting with <bos>, as transformers encodes it."""

import transformers

from jblock.runtime.mock_engine import MockEngine, mock_models
from jblock.serving.frontend import Frontend, GenerationRequest
from jblock.serving.tenants import OPEN

PROMPT = "the cat ate the hat"


def gemma_tokenizer_dir(path) -> str:
  """A tiny Gemma tokenizer (Gemma's special ids, its BPE pipeline, add_bos_token as shipped)."""
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
  for ch in "abcdefghijklmnopqrstuvwxyz▁":
    vocab[ch] = len(vocab)
  merges = [("h", "e"), ("a", "t"), ("▁", "t"), ("▁t", "he")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
  tok.save_pretrained(str(path))
  return str(path)


class RecordingEngine(MockEngine):
  """A mock engine that keeps the prompt tokens of every request it is given."""

  def __init__(self, models):
    super().__init__(models)
    self.prompts = []

  def submit(self, model, prompt_tokens, **kwargs):
    self.prompts.append(list(prompt_tokens))
    return super().submit(model, prompt_tokens, **kwargs)


def test_gemma_text_prompt_starts_with_bos_like_transformers(tmp_path):
  tokenizer_dir = gemma_tokenizer_dir(tmp_path / "gemma")
  reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  expected = reference(PROMPT)["input_ids"]
  assert expected[0] == reference.bos_token_id == 2 and expected.count(2) == 1
  models = mock_models(["gemma"], vocab_size=len(reference), max_seq_len=64,
                       tokenizer_dir=tokenizer_dir)
  engine = RecordingEngine(models)
  frontend = Frontend(engine)
  try:
    g = frontend.generate(OPEN, GenerationRequest(model="gemma", text=PROMPT, max_tokens=1))
    assert len([t for d in g for t in d.token_ids]) == 1
  finally:
    frontend.close()
    engine.close()
  assert engine.prompts == [expected]
