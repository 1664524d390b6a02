"""Serving fixtures: a tiny byte-level BPE tokenizer trained offline, mock engines served
over real gRPC on 127.0.0.1, every server and engine stopped after its test."""

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jblock.client import Client
from jblock.runtime.engine_api import ModelInfo
from jblock.runtime.mock_engine import MockEngine, mock_models
from jblock.serving.coordinator import build_server

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello serving, hello blocks",
    "multi-tenant serving shares blocks between fine-tuned variants",
    "café naïve résumé: unicode text round trips",
]
EOS = "<eos>"
MAX_SEQ_LEN = 128


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(SENTENCES, trainer)
  path = tmp_path_factory.mktemp("tokenizer")
  tokenizer.save(str(path / "tokenizer.json"))
  return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")


@pytest.fixture
def catalog(tokenizer, tokenizer_dir):
  """Two variants with the tokenizer (sharing base blocks) and one token-ids-only model."""
  infos = mock_models(["mock-a", "mock-b"], vocab_size=tokenizer.get_vocab_size(),
                      max_seq_len=MAX_SEQ_LEN, tokenizer_dir=tokenizer_dir)
  infos["mock-ids"] = ModelInfo(name="mock-ids", family="mock", vocab_size=97,
                                max_seq_len=MAX_SEQ_LEN, chain=("ids-embed", "ids-head"))
  return infos


@pytest.fixture
def serve():
  """serve(engine, metrics=None) -> (client, server, port); stops all at the test's end."""
  started = []

  def start(engine, metrics=None):
    server, port = build_server(engine, 0, max_workers=16, metrics=metrics)
    server.start()
    client = Client(f"127.0.0.1:{port}")
    started.append((client, server, engine))
    return client, server, port

  yield start
  for client, server, engine in started:
    client.close()
    server.stop(0).wait(5)
    engine.close()


@pytest.fixture
def engine(catalog):
  engine = MockEngine(catalog, step_delay_s=0.002)
  yield engine
  engine.close()
