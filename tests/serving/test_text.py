"""Tokenizer loading and incremental detokenization (never half a UTF-8 character)."""

import pytest

from jblock.runtime.engine_api import ModelInfo
from jblock.serving import text

SAMPLE = "hello café 🙂 naïve 日本 wörld"


def _stream(tokenizer, ids, prompt=()):
  detokenizer = text.IncrementalDetokenizer(tokenizer, list(prompt))
  deltas = [detokenizer.add([t]) for t in ids]
  return deltas, detokenizer.flush()


def test_deltas_hold_back_partial_characters_and_sum_to_the_text(tokenizer):
  ids = text.encode(tokenizer, SAMPLE)
  # The emoji and CJK characters were not in the training text: several byte tokens each.
  assert len(ids) > len(SAMPLE.split())
  cuts = [k for k in range(len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
  assert len(cuts) >= 3  # inside 🙂, 日 and 本 at least
  deltas, tail = _stream(tokenizer, ids)
  assert "".join(deltas) + tail == SAMPLE
  assert not any("\ufffd" in d for d in deltas)
  assert tail == ""
  assert "" in deltas  # some tokens completed no character yet


def test_prompt_context_keeps_the_first_tokens_spacing(tokenizer):
  prompt = text.encode(tokenizer, "hello")
  ids = text.encode(tokenizer, " world, hello")
  deltas, tail = _stream(tokenizer, ids, prompt)
  assert "".join(deltas) + tail == " world, hello"
  assert deltas[0].startswith(" ")


def test_flush_returns_a_truncated_character(tokenizer):
  ids = text.encode(tokenizer, "ok 🙂")
  deltas, tail = _stream(tokenizer, ids[:-1])  # the emoji's last byte never comes
  assert "".join(deltas) == "ok "
  assert tail == tokenizer.decode(ids[:-1])[len("ok "):]
  assert tail.endswith("\ufffd")


def test_tokenizer_cache_loads_once_and_reports_missing_files(tokenizer_dir, tmp_path):
  cache = text.TokenizerCache()
  info = ModelInfo("m", "mock", 300, 64, ("b",), tokenizer_dir=tokenizer_dir)
  assert cache.get(info) is cache.get(info)
  assert cache.get(ModelInfo("n", "mock", 300, 64, ("b",))) is None
  broken = ModelInfo("x", "mock", 300, 64, ("b",), tokenizer_dir=str(tmp_path))
  with pytest.raises(text.TokenizerError, match="tokenizer.json") as e:
    cache.get(broken)
  assert e.value.grpc_code == "FAILED_PRECONDITION"
