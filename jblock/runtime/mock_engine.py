"""The real engine over fake block instances, so serving is testable on CPU without models.

MockEngine is the block `Engine` — its scheduler (admission, fairness, KV page leases, cancel,
drain on unload), its segments and executors — with one difference: each block instance computes
fake arithmetic in numpy instead of a model. The fake layers blocks really store every token in
their KV pages and read them back through the page tables, so a wrong page table shows up as
wrong tokens. The next token is deterministic (`mock_next_token`), a function of the request's own
context, so a request's output never depends on its batch-mates.
"""

import time
from typing import Mapping, Sequence

import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.errors import NotFoundError, OverloadedError, UnavailableError
from jblock.models.config import ModelConfig
from jblock.runtime import engine_api
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
from jblock.runtime.engine_api import ModelInfo, RequestHandle, SamplingParams
from jblock.runtime.executor import stage_input
from jblock.runtime.head_rows import TOP
from jblock.runtime.instance import instance_stats
from jblock.runtime.instance import InstanceBase
from jblock.runtime.kv import PagePool
from jblock.runtime.step import BlockBatch

MOCK_PLACEMENT = "mock:0"
_PAGE_SIZE = 16


def mock_next_token(context_sum: int, step: int, vocab_size: int, seed: int = 0,
                    temperature: float = 0.0) -> int:
  """The fake model: next = (sum(context) * 31 + step) % vocab; sampling mixes in the seed."""
  salt = seed * 7919 if temperature > 0 else 0
  return (context_sum * 31 + step + salt) % vocab_size


def mock_generate(info: ModelInfo, prompt_tokens: Sequence[int],
                  params: SamplingParams = SamplingParams()) -> tuple[list[int], str]:
  """What MockEngine returns for a request, computed without the engine: (tokens, reason)."""
  stop_ids = set(params.stop_token_ids) | set(info.eos_token_ids)
  context_sum, length, tokens = sum(prompt_tokens), len(prompt_tokens), []
  while True:
    token = mock_next_token(context_sum, len(tokens), info.vocab_size, params.seed,
                            params.temperature)
    if token in stop_ids:
      return tokens, engine_api.STOP
    tokens.append(token)
    context_sum += token
    length += 1
    if len(tokens) == params.max_new_tokens or length >= info.max_seq_len:
      return tokens, engine_api.LENGTH


def mock_models(names: Sequence[str], vocab_size: int = 256, max_seq_len: int = 256,
                tokenizer_dir: str | None = None, eos_token_ids: tuple[int, ...] = ()
                ) -> dict[str, ModelInfo]:
  """Variants of one base: they share its embedding and first layers block, each has its
  own top layers and head (a partial fine-tune), so Stats shows sharing."""
  return {
      name: ModelInfo(name=name, family="mock", vocab_size=vocab_size, max_seq_len=max_seq_len,
                      chain=("mock-embed", "mock-layers-0", f"mock-layers-1-{name}",
                             f"mock-head-{name}"),
                      tokenizer_dir=tokenizer_dir, eos_token_ids=tuple(eos_token_ids))
      for name in names
  }


def _block_kind(position: int, chain_len: int) -> str:
  if position == 0:
    return EMBED
  return HEAD if position == chain_len - 1 else LAYERS


class FakeInstance(InstanceBase):
  """A block with fake arithmetic. Hidden states are int64 [B, T, 2]: (token, sum of the row's
  context up to this position as read back from the KV pages)."""

  def __init__(self, key: str, block_id: str, kind: str, batch_size: int, kv_slots: int,
               max_seq_len: int, resident_bytes: int, vocab_size: int, step_delay_s: float):
    self.key, self.block_id, self.kind, self.batch_size = key, block_id, kind, batch_size
    self.config = {"vocab_size": vocab_size}
    self.models: set[str] = set()
    self.resident_bytes = resident_bytes
    self.placement = MOCK_PLACEMENT
    self.executor_key = MOCK_PLACEMENT  # one executor thread for every fake block
    self.batches_run = self.items_run = 0
    self._delay = step_delay_s if kind == HEAD else 0.0  # one step costs one delay
    self.pool = None
    if kind == LAYERS:
      pages = kv_slots * -(-max_seq_len // _PAGE_SIZE)
      self.pool = PagePool(pages, _PAGE_SIZE, kv_slots)
      self.kv = np.zeros((pages, _PAGE_SIZE), np.int64)

  def run_batch(self, batch: BlockBatch):
    x = np.asarray(stage_input(batch))
    meta = batch.meta
    if self.kind == EMBED:
      return np.stack([x.astype(np.int64), np.zeros_like(x, np.int64)], axis=-1)
    if self.kind == LAYERS:
      return self._layers(x.copy(), meta, batch.segment.layers.index(self))
    if self._delay:
      time.sleep(self._delay)
    last = np.maximum(meta.n_valid - 1, 0)
    sums = x[np.arange(x.shape[0]), last, 1]
    salt = np.where(meta.temperature > 0, _seeds(meta) * 7919, 0)
    vocab = self.config["vocab_size"]
    tokens = ((sums * 31 + meta.step + salt) % vocab).astype(np.int32)
    if meta.head is None or "logprobs" not in meta.head:
      return tokens
    # A fake distribution for logprobs: the token has probability 1/2, the next ids 1/4, 1/8...
    top_ids = (tokens[:, None] + np.arange(TOP)[None, :]) % vocab
    top_logprobs = np.tile(np.log(0.5) * (1 + np.arange(TOP, dtype=np.float32)), (len(tokens), 1))
    return {"tokens": tokens, "logprob": top_logprobs[:, 0].copy(),
            "top_ids": top_ids.astype(np.int32), "top_logprobs": top_logprobs}

  def _layers(self, x, meta, table_index: int):
    encoded = meta.page_tables[table_index]
    tables = np.where(encoded < 0, -1 - encoded, encoded)  # read-only pages (jblock.runtime.kv)
    for row in range(x.shape[0]):
      start, n = int(meta.starts[row]), int(meta.n_valid[row])
      for j in range(n):  # write this chunk's tokens into the row's pages (not read-only ones)
        pos = start + j
        if encoded[row, pos // _PAGE_SIZE] >= 0:
          self.kv[tables[row, pos // _PAGE_SIZE], pos % _PAGE_SIZE] = x[row, j, 0]
      if n:  # read the whole context back through the page table
        context = self.kv[tables[row, :-(-(start + n) // _PAGE_SIZE)]].reshape(-1)[:start + n]
        x[row, :n, 1] = np.cumsum(context)[start:start + n]
    return x

  def stats(self) -> dict:
    return instance_stats(self)


def _seeds(meta) -> np.ndarray:
  lo = meta.seed_lo.view(np.uint32).astype(np.int64)
  hi = meta.seed_hi.view(np.uint32).astype(np.int64)
  return (hi << 32) | lo


def _mock_spec(info: ModelInfo) -> ModelSpec:
  """A chain of fake blocks; a chain with no layers block gets a private one (the fake KV lives
  there), named `<model>:kv`, which the model's ModelInfo does not list."""
  chain = list(info.chain)
  if len(chain) < 2:
    raise ValueError(f"mock model {info.name!r}: the chain needs an embed and a head, got {chain}")
  if len(chain) == 2:
    chain.insert(1, f"{info.name}:kv")
  kinds = [_block_kind(p, len(chain)) for p in range(len(chain))]
  config = ModelConfig(
      family=info.family, architecture="mock", vocab_size=info.vocab_size, hidden_size=2,
      num_layers=kinds.count(LAYERS), num_heads=1, num_kv_heads=1, head_dim=1,
      intermediate_size=1, norm="rms", norm_eps=1e-6, mlp="plain", activation="relu",
      qkv_bias=False, o_bias=False, mlp_bias=False, rope=None,
      max_position_embeddings=info.max_seq_len, learned_positions=False,
      tie_word_embeddings=False, sliding_windows=(0,) * kinds.count(LAYERS),
      eos_token_ids=tuple(info.eos_token_ids))
  return ModelSpec(info.name, config, [Block(k, {}, {}) for k in kinds], info.tokenizer_dir,
                   block_ids=chain)


class MockEngine(Engine):
  """The block engine with FakeInstance blocks; see the module docstring."""

  def __init__(self, models: Mapping[str, ModelInfo], *, step_delay_s: float = 0.0,
               max_queue: int = 64, kv_slots: int = 16, batch_size: int = 8,
               block_bytes: int = 1 << 20, zoo: Mapping[str, ModelInfo] | None = None):
    """`models` are loaded at start; `zoo` (default: `models`) is what load_model can load.
    Every layers block has `kv_slots` leases and every block runs batches of `batch_size` rows."""
    for name, info in models.items():
      if name != info.name:
        raise ValueError(f"model key {name!r} differs from its ModelInfo.name {info.name!r}")
    self._mock_zoo = dict(zoo if zoo is not None else models)
    for info in models.values():
      self._mock_zoo.setdefault(info.name, info)
    max_len = max([i.max_seq_len for i in self._mock_zoo.values()] + [1])
    infos = {**self._mock_zoo}

    def factory(key, block, block_id, size, table):
      info = next(i for i in infos.values() if block_id in _mock_spec(i).block_ids)
      return FakeInstance(key, block_id, block.kind, size, kv_slots, max_len, block_bytes,
                          info.vocab_size, step_delay_s)

    self._counts = {"submitted": 0, "rejected": 0}
    config = EngineConfig(batch_size=batch_size, kv_slots=kv_slots, max_seq_len=max_len,
                          page_size=_PAGE_SIZE, max_waiting=max_queue, warmup=False)
    super().__init__([_mock_spec(i) for i in models.values()], config=config,
                     instance_factory=factory, mesh_shape=(1, 1))

  def submit(self, model: str, prompt_tokens: Sequence[int], **kwargs) -> RequestHandle:
    try:
      handle = super().submit(model, prompt_tokens, **kwargs)
    except OverloadedError:
      self._counts["rejected"] += 1
      raise
    self._counts["submitted"] += 1
    return handle

  def load_model(self, name: str) -> ModelInfo:
    with self._lock:
      if name in self._draining:
        raise UnavailableError(f"model {name!r} is being unloaded; load it again afterwards")
      if name in self._models:
        return self._info(self._models[name][0])
    if name not in self._mock_zoo:
      raise NotFoundError(f"model {name!r} is not in the zoo; known: {sorted(self._mock_zoo)}")
    self._add_model(_mock_spec(self._mock_zoo[name]))
    return self._mock_zoo[name]

  def _info(self, spec: ModelSpec) -> ModelInfo:
    return self._mock_zoo[spec.name]

  def stats(self) -> dict:
    out = super().stats()
    finished = out["requests"]["finished"]
    out["requests"].update(
        submitted=self._counts["submitted"], rejected=self._counts["rejected"],
        running=out["requests"]["active"], queued=out["requests"]["waiting"],
        completed=finished.get(engine_api.STOP, 0) + finished.get(engine_api.LENGTH, 0),
        cancelled=finished.get(engine_api.CANCELLED, 0), failed=finished.get(engine_api.ERROR, 0))
    return out
