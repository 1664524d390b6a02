"""The protocol-neutral frontend: incremental text equals a whole decode, stop strings."""

from tokenizers import decoders

from jblock.runtime.mock_engine import MockEngine
from jblock.serving import text
from jblock.serving.frontend import Frontend, GenerationRequest
from jblock.serving.tenants import OPEN

SAMPLES = ["hello café 🙂 naïve 日本 wörld", " world, hello", "ok 🙂🙂 the lazy dog"]


def test_decode_stream_deltas_equal_the_whole_decode_and_the_old_detokenizer(tokenizer):
  prompt = text.encode(tokenizer, "hello")
  for sample in SAMPLES:
    ids = text.encode(tokenizer, sample)
    stream = decoders.DecodeStream(ids=prompt[-6:], skip_special_tokens=True)
    deltas = [stream.step(tokenizer, t) or "" for t in ids]
    assert not any("\ufffd" in d for d in deltas)
    whole = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
    assert "".join(deltas) == whole
    old = text.IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(old.add([t]) for t in ids) + old.flush() == whole


def test_a_stream_ending_inside_a_character_keeps_its_bytes(catalog, tokenizer):
  """The deltas of every request concatenate to the whole decode of its tokens, also when the
  last tokens are an incomplete UTF-8 character (U+FFFD in the whole decode, as transformers'
  decode gives), which used to be dropped."""
  engine = MockEngine(catalog)
  frontend = Frontend(engine)
  try:
    broken_endings = 0
    for max_tokens in range(1, 41):
      g = frontend.generate(OPEN, GenerationRequest(model="mock-a", text="hello",
                                                     max_tokens=max_tokens))
      deltas = list(g)
      ids = [t for d in deltas for t in d.token_ids]
      assert len(ids) == g.usage.completion_tokens
      whole = tokenizer.decode(ids, skip_special_tokens=True)
      assert "".join(d.text for d in deltas) == whole, max_tokens
      broken_endings += whole.endswith("\ufffd")
    assert broken_endings > 0  # the case the flush is for did occur
  finally:
    frontend.close()
    engine.close()


def test_stop_strings_are_held_back_and_cut_in_one_place(catalog):
  engine = MockEngine(catalog)
  frontend = Frontend(engine)
  try:
    def run(stop=()):
      g = frontend.generate(OPEN, GenerationRequest(model="mock-a", text="hello", max_tokens=40,
                                                     stop=stop))
      deltas = list(g)
      return "".join(d.text for d in deltas), g, deltas

    full, g, _ = run()
    assert g.finish_reason == "length" and g.usage.completion_tokens == 40
    for cut in (1, 7, len(full) // 2):
      stop = full[cut:cut + 3]
      out, g, deltas = run([stop, "never-there"])
      assert out == full[:full.index(stop)] and g.finish_reason == "stop"
      # Tokens up to the one that completed the stop string, no further.
      assert sum(len(d.token_ids) for d in deltas) == g.usage.completion_tokens < 40
      assert stop not in out
  finally:
    frontend.close()
    engine.close()


def test_eos_ids_of_generation_config_json_end_generation(tmp_path, tokenizer, tokenizer_dir,
                                                          catalog):
  import json
  import shutil
  from jblock.runtime.engine_api import ModelInfo, SamplingParams
  from jblock.runtime.mock_engine import mock_generate
  info = catalog["mock-a"]
  prompt = text.encode(tokenizer, "hello")
  full, _ = mock_generate(info, prompt, SamplingParams(max_new_tokens=20))
  eos = full[5]
  gen_dir = tmp_path / "tok"
  shutil.copytree(tokenizer_dir, gen_dir)
  (gen_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 10**9]}))
  models = {"g": ModelInfo("g", "mock", info.vocab_size, info.max_seq_len, info.chain,
                           tokenizer_dir=str(gen_dir))}
  engine = MockEngine(models)
  frontend = Frontend(engine)
  try:
    g = frontend.generate(OPEN, GenerationRequest(model="g", text="hello", max_tokens=20))
    tokens = [t for d in g for t in d.token_ids]
    assert tokens == full[:full.index(eos)] and g.finish_reason == "stop"
  finally:
    frontend.close()
    engine.close()
