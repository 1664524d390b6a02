"""Structured output (jblock.serving.grammar): random models constrained by JSON schemas always
produce JSON that validates; bad response_formats are refused naming the field; padding ids are
never allowed; forks are independent; background masks equal synchronously built ones."""

import json
import threading

import jsonschema
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jblock.errors import InvalidRequestError
from jblock.serving import grammar as grammar_module
from jblock.serving.grammar import GrammarCompiler, apply_bitmask_numpy

EOS, PAD = "<eos>", "<pad>"
MAX_STEPS = 200
WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "yes", "no", "name", "id",
         "city", "zip", "tags", "value", "items", "code", "true", "false", "null", "Paris"]

SCHEMAS = {
    "nested_objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                               "geo": {"type": "object",
                                       "properties": {"lat": {"type": "number", "minimum": -90,
                                                              "maximum": 90,
                                                              "multipleOf": 0.25}},
                                       "required": ["lat"], "additionalProperties": False}},
                "required": ["city", "zip", "geo"], "additionalProperties": False},
        },
        "required": ["name", "age", "address"], "additionalProperties": False},
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"enum": [1, 2, 3, "large", None]},
                       "ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["color", "size", "ok", "nothing"], "additionalProperties": False},
    "arrays": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"type": "object",
                                "properties": {"id": {"type": "integer", "minimum": 1,
                                                      "maximum": 999},
                                               "tag": {"type": "string", "maxLength": 5}},
                                "required": ["id", "tag"], "additionalProperties": False}},
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2,
                      "maxItems": 2}},
        "required": ["items", "flags"], "additionalProperties": False},
    "string_patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"},
            "word": {"type": "string", "minLength": 2, "maxLength": 6}},
        "required": ["code", "email", "word"], "additionalProperties": False},
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": -50, "maximum": 50},
                                {"type": "string", "maxLength": 4},
                                {"type": "null"},
                                {"type": "object", "properties": {"x": {"type": "boolean"}},
                                 "required": ["x"], "additionalProperties": False}]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["value", "count"], "additionalProperties": False},
}


def schema_format(schema: dict, strict: bool = True) -> dict:
  return {"type": "json_schema",
          "json_schema": {"name": "test", "schema": schema, "strict": strict}}


def train_corpus() -> list[str]:
  """Prose and JSON records, so the vocabulary has tokens that span JSON punctuation."""
  rng = np.random.default_rng(0)
  records = []
  for _ in range(400):
    keys = rng.choice(WORDS, size=3, replace=False)
    record = {str(key): (str(rng.choice(WORDS)) if rng.random() < 0.5 else int(rng.integers(1000)))
              for key in keys}
    records.append(json.dumps(record, separators=(",", ":")))
  return ["the quick brown fox jumps over the lazy dog", "hello world, hello blocks"] + records


def byte_level_tokenizer(vocab_size: int, special_tokens: list[str]) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(train_corpus(), trainer)
  return tokenizer


@pytest.fixture(scope="session")
def json_tokenizer() -> tokenizers.Tokenizer:
  return byte_level_tokenizer(1000, [EOS, PAD])


@pytest.fixture(scope="session")
def compiler(json_tokenizer) -> GrammarCompiler:
  # Model rows past the tokenizer's (padding, as many checkpoints have) must never be allowed.
  return GrammarCompiler(json_tokenizer, vocab_size=json_tokenizer.get_vocab_size() + 40,
                         eos_ids=[json_tokenizer.token_to_id(EOS)])


def allowed_ids(mask: np.ndarray) -> np.ndarray:
  return np.flatnonzero(np.unpackbits(mask.astype("<i4").view(np.uint8), bitorder="little"))


def generate(constraint, rng, vocab_size, eos, sample=False):
  """Random logits masked by the constraint; returns (tokens but eos, whether it finished)."""
  tokens = []
  for _ in range(MAX_STEPS):
    logits = rng.standard_normal((1, vocab_size)).astype(np.float32)
    masked = apply_bitmask_numpy(logits, constraint.mask()[None])[0]
    if sample:
      probs = np.exp(masked - masked.max())
      token = int(rng.choice(vocab_size, p=probs / probs.sum()))
    else:
      token = int(np.argmax(masked))
    assert constraint.accept(token)
    if token != eos:
      tokens.append(token)
    if constraint.finished():
      break
  return tokens, constraint.finished()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_generations_validate_against_the_schema(compiler, json_tokenizer, name):
  schema = SCHEMAS[name]
  grammar = compiler.compile(schema_format(schema))
  rng = np.random.default_rng(len(name))
  eos = json_tokenizer.token_to_id(EOS)
  for index in range(10):
    constraint = compiler.constraint(grammar)
    tokens, ended = generate(constraint, rng, compiler.width * 32, eos, sample=index % 2 == 1)
    assert ended, json_tokenizer.decode(tokens)
    text = json_tokenizer.decode(tokens)
    jsonschema.validate(json.loads(text), schema)
    assert "\n" not in text and ": " not in text  # compact: no free-running whitespace
    # Complete: nothing but eos may follow, and eos is accepted.
    assert list(allowed_ids(constraint.mask())) == [eos]


def test_json_object_gives_an_object_and_eos_only_once_complete(compiler, json_tokenizer):
  grammar = compiler.compile({"type": "json_object"})
  eos = json_tokenizer.token_to_id(EOS)
  constraint = compiler.constraint(grammar)
  first = allowed_ids(constraint.mask())
  assert eos not in first and all(json_tokenizer.decode([t]).startswith("{") for t in first)
  for token in json_tokenizer.encode('{"a":[1,"b"]').ids:
    assert constraint.accept(token) and not constraint.finished()
    assert eos not in allowed_ids(constraint.mask())
  assert constraint.accept(json_tokenizer.token_to_id("}"))
  assert constraint.finished() and list(allowed_ids(constraint.mask())) == [eos]
  assert not constraint.accept(json_tokenizer.token_to_id("}"))
  assert constraint.accept(eos) and constraint.finished()


def accepts(compiler, tokenizer, response_format, text) -> bool:
  """Whether the grammar takes `text`, tokenised as the tokenizer does, as a complete value."""
  constraint = compiler.constraint(compiler.compile(response_format))
  return all(constraint.accept(token) for token in tokenizer.encode(text).ids) and \
      constraint.finished()


@pytest.mark.parametrize("text, valid", [
    ('{"x":-1.5e3,"n":7}', True), ('{"x":0.125,"n":-2}', True), ('{"x":1,"n":0}', True),
    ('{"x":01,"n":0}', False), ('{"x":1.,"n":0}', False), ('{"x":1,"n":1.5}', False),
    ('{"x":"1","n":0}', False), ('{"x":1}', False), ('{"x":1,"n":0,"y":2}', False),
    ('{ "x":1,"n":0}', False),  # compact: no whitespace
])
def test_numbers_and_integers(compiler, json_tokenizer, text, valid):
  schema = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"}},
            "required": ["x", "n"], "additionalProperties": False}
  assert accepts(compiler, json_tokenizer, schema_format(schema), text) == valid


def test_a_disallowed_token_is_refused(compiler, json_tokenizer):
  constraint = compiler.constraint(compiler.compile(schema_format(SCHEMAS["enums"])))
  before = constraint.mask()
  assert not constraint.accept(json_tokenizer.token_to_id("a"))
  assert not constraint.accept(-1) and not constraint.accept(compiler.width * 32)
  np.testing.assert_array_equal(constraint.mask(), before)  # a refusal leaves the state alone


def test_ids_the_tokenizer_lacks_are_never_allowed(compiler, json_tokenizer):
  known = json_tokenizer.get_vocab_size()
  vocab_size = known + 40
  assert compiler.width == (vocab_size + 31) // 32
  pad = json_tokenizer.token_to_id(PAD)
  rng = np.random.default_rng(7)
  for name in ("arrays", "any_of"):
    constraint = compiler.constraint(compiler.compile(schema_format(SCHEMAS[name])))
    for _ in range(MAX_STEPS):
      mask = constraint.mask()
      assert mask.dtype == np.int32 and mask.shape == (compiler.width,)
      allowed = allowed_ids(mask)
      assert allowed.max() < known and pad not in allowed
      assert not constraint.accept(int(rng.integers(known, vocab_size)))
      assert constraint.accept(int(rng.choice(allowed)))
      if constraint.finished():
        break
    assert constraint.finished()


def test_background_masks_equal_synchronously_built_ones(compiler, json_tokenizer):
  grammar = compiler.compile(schema_format(SCHEMAS["nested_objects"]))
  constraint = compiler.constraint(grammar)
  replay = grammar.start()  # a second llguidance matcher, advanced and masked on this thread
  rng = np.random.default_rng(3)
  for _ in range(MAX_STEPS):
    synchronous = np.zeros(compiler.width, dtype=np.int32)
    replay.unsafe_compute_mask_ptr(synchronous.ctypes.data, synchronous.nbytes)
    np.testing.assert_array_equal(constraint.mask(), synchronous)
    token = int(rng.choice(allowed_ids(constraint.mask())))
    assert constraint.accept(token)
    if constraint.finished():
      break
    assert replay.consume_token(token)
  assert constraint.finished()


def test_forks_are_independent(compiler, json_tokenizer):
  grammar = compiler.compile(schema_format(SCHEMAS["enums"]))
  constraint = compiler.constraint(grammar)
  for token in json_tokenizer.encode('{"color":"').ids:
    assert constraint.accept(token)
  fork = constraint.fork()
  np.testing.assert_array_equal(fork.mask(), constraint.mask())
  red, blue = json_tokenizer.encode("red").ids, json_tokenizer.encode("blue").ids
  for token in red:
    assert constraint.accept(token)
  for token in blue:
    assert fork.accept(token)
  rest = json_tokenizer.encode('","size":1,"ok":true,"nothing":null}').ids
  for token in rest:
    assert constraint.accept(token) and fork.accept(token)
  assert constraint.finished() and fork.finished()
  texts = [json_tokenizer.decode(json_tokenizer.encode('{"color":"').ids + color + rest)
           for color in (red, blue)]
  assert [json.loads(text)["color"] for text in texts] == ["red", "blue"]
  # A fresh constraint from the same grammar starts over: forks did not touch the grammar.
  assert not compiler.constraint(grammar).accept(json_tokenizer.token_to_id("red"))


def test_constraints_advance_on_several_threads_at_once(compiler, json_tokenizer):
  grammar = compiler.compile(schema_format(SCHEMAS["arrays"]))
  results, errors = [], []

  def run(seed):
    try:
      rng = np.random.default_rng(seed)
      for _ in range(3):
        tokens, ended = generate(compiler.constraint(grammar), rng, compiler.width * 32,
                                 json_tokenizer.token_to_id(EOS))
        results.append((json_tokenizer.decode(tokens), ended))
    except Exception as error:  # reported on the test's thread
      errors.append(error)

  threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors and len(results) == 12
  for text, ended in results:
    assert ended
    jsonschema.validate(json.loads(text), SCHEMAS["arrays"])


def nested_schema(depth: int) -> dict:
  schema: dict = {}
  for _ in range(depth):
    schema = {"type": "array", "items": schema}
  return schema


@pytest.mark.parametrize("response_format, field", [
    ("json", "response_format"),
    ({"type": "yaml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}},
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    (schema_format(["not", "an", "object"]), "response_format.json_schema.schema"),
    (schema_format({"type": "nonsense"}), "response_format.json_schema.schema"),
    (schema_format({"type": "string", "pattern": "(["}), "response_format.json_schema.schema"),
    (schema_format({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema"),
    (schema_format({"type": "integer", "minimum": 5, "maximum": 2}),
     "response_format.json_schema.schema"),
    (schema_format({"type": "object", "description": "x" * (64 * 1024)}),
     "response_format.json_schema.schema"),
    (schema_format(nested_schema(200)), "response_format.json_schema.schema"),  # llguidance: 128
    (schema_format(nested_schema(2000)), "response_format.json_schema.schema"),  # Python's limit
    # strict refuses keywords the engine cannot enforce; strict: false ignores them.
    (schema_format({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema"),
])
def test_invalid_response_formats_name_the_field(compiler, response_format, field):
  with pytest.raises(InvalidRequestError) as raised:
    compiler.compile(response_format)
  assert raised.value.field == field, str(raised.value)


def test_text_is_unconstrained_and_strict_false_is_lenient(compiler):
  assert compiler.compile(None) is None and compiler.compile({"type": "text"}) is None
  assert compiler.compile(schema_format({"type": "array", "uniqueItems": True}, strict=False))


def test_compiled_grammars_are_cached_and_the_cache_is_bounded(compiler, monkeypatch):
  monkeypatch.setattr(grammar_module, "GRAMMAR_CACHE_SIZE", 2)
  formats = [schema_format({"type": "object", "properties": {f"k{i}": {"type": "integer"}}})
             for i in range(3)]
  first = compiler.compile(formats[0])
  # Key order does not matter: the cache key is the canonical JSON.
  reordered = {"json_schema": dict(reversed(list(formats[0]["json_schema"].items()))),
               "type": "json_schema"}
  assert compiler.compile(reordered) is first
  compiler.compile(formats[1])
  compiler.compile(formats[2])
  assert compiler.compile(formats[0]) is not first  # evicted, compiled again


def test_apply_bitmask_numpy():
  logits = np.arange(2 * 40, dtype=np.float32).reshape(2, 40)
  masks = np.zeros((2, 1), dtype=np.int32)  # 32 ids covered: 32..39 always disallowed
  masks[0, 0] = (1 << 0) | (1 << 5)
  masks[1, 0] = np.int32(-(1 << 31))  # bit 31 only
  masked = apply_bitmask_numpy(logits, masks)
  assert masked.dtype == np.float32
  assert list(np.flatnonzero(np.isfinite(masked[0]))) == [0, 5]
  assert list(np.flatnonzero(np.isfinite(masked[1]))) == [31]
  assert masked[0, 5] == logits[0, 5]


def gpt2_style_tokenizer() -> tokenizers.Tokenizer:
  """GPT-2's layout offline: 50,257 byte-level BPE tokens with <|endoftext|> last (50256).
  Merges learnt from the corpus, padded to GPT-2's size with merges of byte pairs."""
  learnt = json.loads(byte_level_tokenizer(2000, []).to_str())["model"]
  vocab, merges = dict(learnt["vocab"]), [tuple(merge) for merge in learnt["merges"]]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  for left in alphabet:
    for right in alphabet:
      if len(vocab) == 50256:
        break
      if left + right not in vocab:
        vocab[left + right] = len(vocab)
        merges.append((left, right))
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(["<|endoftext|>"])
  return tokenizer


def test_gpt2_sized_byte_level_bpe():
  tokenizer = gpt2_style_tokenizer()
  assert tokenizer.get_vocab_size() == 50257 and tokenizer.token_to_id("<|endoftext|>") == 50256
  compiler = GrammarCompiler(tokenizer, vocab_size=50304, eos_ids=[50256])  # GPT-2's padded rows
  assert compiler.width == 1572
  rng = np.random.default_rng(11)
  for name in ("nested_objects", "string_patterns"):
    grammar = compiler.compile(schema_format(SCHEMAS[name]))
    for _ in range(2):
      constraint = compiler.constraint(grammar)
      tokens, ended = generate(constraint, rng, 50304, eos=50256)
      assert ended and allowed_ids(constraint.mask()).tolist() == [50256]
      jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS[name])
