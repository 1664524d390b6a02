"""The block engine serves many variants at once and gives each request what it would get alone."""


import dataclasses
import jax
import numpy as np
import pytest
import torch
import transformers

import jblock
from jblock.convert import convert
from jblock.errors import InvalidRequestError, NotFoundError, OverloadedError
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
from tests import hf_models

NEW_TOKENS = 16
CONFIG = EngineConfig(batch_size=4, batch_size_by_kind=(("head", 8),), kv_slots=12, max_seq_len=64,
                      prefill_chunk=16, length_buckets=(8, 16))
# 12 requests over 3 variants; lengths 3..21 so some prompts take two prefill chunks.
PROMPTS = [list(np.random.default_rng(i).integers(0, 128, 3 + (i * 7) % 19)) for i in range(12)]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
  root = tmp_path_factory.mktemp("engine")
  cls_name, kwargs = hf_models.ENGINE_BASE
  base = str(root / "base")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).eval()
  model.save_pretrained(base)
  dirs = hf_models.partial_variants(base, str(root), n=3, top_layers=1)
  specs = []
  for i, d in enumerate(dirs):
    c = convert(d)
    specs.append(ModelSpec(f"v{i}", c.config, c.blocks))
  return dirs, specs


@pytest.fixture(scope="module")
def expected(variants):
  """Greedy tokens per request from transformers, checked equal to jblock's reference path."""
  dirs, specs = variants
  out = {}
  for v in range(3):
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(dirs[v], dtype=torch.float32).eval()
    rows = [i for i in range(len(PROMPTS)) if i % 3 == v]
    ours = jblock.Model(specs[v].config, specs[v].chain).generate([PROMPTS[i] for i in rows], NEW_TOKENS)
    for row, i in enumerate(rows):
      with torch.no_grad():
        ref = torch_model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPTS[i]):]
      assert ours[row].tolist() == ref.tolist()
      out[i] = ref.tolist()
  return [out[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def shared_engine(variants):
  engine = Engine(variants[1], sharing=True, mesh_shape=(1, 1), config=CONFIG)
  yield engine
  engine.close()


def _run_all(engine):
  handles = [engine.submit(f"v{i % 3}", p, max_new_tokens=NEW_TOKENS) for i, p in enumerate(PROMPTS)]
  return [h.result(timeout=300) for h in handles]


def test_concurrent_mixed_requests_match_transformers(shared_engine, expected):
  assert _run_all(shared_engine) == expected


def test_shared_blocks_resident_once_and_batched_across_models(shared_engine, variants, expected):
  stats = shared_engine.stats()
  chains = [[b.id for b in spec.chain] for spec in variants[1]]
  distinct = {b.id: b.nbytes for spec in variants[1] for b in spec.chain}
  assert len(stats["blocks"]) == len(distinct) == 1 + 3 + 1 + 3  # embed, 3 shared layers, head, 3 tops
  assert stats["resident_bytes"] == sum(distinct.values())
  shared_ids = set(chains[0]) & set(chains[1]) & set(chains[2])
  for block in stats["blocks"]:
    assert block["models"] == (["v0", "v1", "v2"] if block["block_id"] in shared_ids else
                               [f"v{next(i for i, c in enumerate(chains) if block['block_id'] in c)}"])
  trace = shared_engine.trace()
  mixed = [t for t in trace if len(t["models"]) > 1]
  assert mixed and all(set(t["blocks"]) <= {i[:12] for i in shared_ids} for t in mixed)
  sizes = {b["block_id"][:12]: b["batch_size"] for b in stats["blocks"]}
  assert all(t["items"] <= min(sizes[b] for b in t["blocks"]) for t in trace)
  assert {b["kind"]: b["batch_size"] for b in stats["blocks"]} == {"embed": 4, "layers": 4, "head": 8}


def test_request_alone_matches(shared_engine, expected):
  for i in (0, 5):
    assert shared_engine.submit(f"v{i % 3}", PROMPTS[i], max_new_tokens=NEW_TOKENS).result(300) == expected[i]


def test_per_model_baseline_gives_same_tokens_and_shares_nothing(variants, expected):
  with Engine(variants[1], sharing=False, mesh_shape=(1, 1), config=CONFIG) as engine:
    assert _run_all(engine) == expected
    stats = engine.stats()
    assert len(stats["blocks"]) == 3 * 6
    assert all(len(b["models"]) == 1 for b in stats["blocks"])
    assert all(len(t["models"]) == 1 for t in engine.trace())


def test_eight_device_mesh_gives_same_tokens(variants, expected):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  # No warm-up: on 8 devices compiling every bucket ahead costs more than the shapes this hits.
  config = dataclasses.replace(CONFIG, warmup=False)
  with Engine(variants[1], sharing=True, mesh_shape=(4, 2), config=config) as engine:
    assert _run_all(engine) == expected
    layers = next(i for i in engine._instances.values() if i.kind == "layers")
    q = layers.params["layer_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert layers.kv["k"].sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None, None)


def test_kv_buffers_are_donated_not_copied(shared_engine):
  inst = next(i for i in shared_engine._instances.values() if i.kind == "layers")
  before = inst.kv["k"]
  assert shared_engine.submit("v0", PROMPTS[0], max_new_tokens=2).result(60)
  assert before.is_deleted()  # the call consumed the buffer: updated in place, never copied whole


def test_seeded_sampling_is_reproducible_across_batch_compositions(shared_engine):
  kw = dict(max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
  alone = shared_engine.submit("v1", PROMPTS[3], **kw).result(60)
  crowd = [shared_engine.submit(f"v{i % 3}", p, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i)
           for i, p in enumerate(PROMPTS[:6])]
  together = shared_engine.submit("v1", PROMPTS[3], **kw).result(60)
  for h in crowd:
    h.result(60)
  assert alone == together
  other_seed = shared_engine.submit("v1", PROMPTS[3], **dict(kw, seed=99)).result(60)
  assert other_seed != alone
  greedy = shared_engine.submit("v1", PROMPTS[3], max_new_tokens=NEW_TOKENS).result(60)
  assert alone != greedy


def test_top_k_one_is_greedy(shared_engine, expected):
  out = shared_engine.submit("v0", PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=2.0, top_k=1,
                             seed=5).result(60)
  assert out == expected[0]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_tiny_top_p_keeps_the_most_likely_token(shared_engine, expected):
  # 1e-9 is tiny; 1e-50 rounds to 0 in float32 (it once kept no token: token 0, often EOS).
  for top_p in (1e-9, 1e-50):
    out = shared_engine.submit("v0", PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=1.0,
                               top_p=top_p, seed=7).result(60)
    assert out == expected[0], top_p
  with pytest.raises(InvalidRequestError, match="top_p"):
    shared_engine.submit("v0", PROMPTS[0], temperature=1.0, top_p=0.0)
  with pytest.raises(InvalidRequestError, match="temperature"):
    shared_engine.submit("v0", PROMPTS[0], temperature=1e300)


def test_stop_tokens_end_the_request(shared_engine, expected):
  stop = expected[0][4]
  h = shared_engine.submit("v0", PROMPTS[0], max_new_tokens=NEW_TOKENS, stop_token_ids=[stop])
  out = h.result(60)
  assert out == expected[0][:expected[0].index(stop)] and h.finish_reason == "stop"


def test_kv_exhaustion_queues_and_cancel_frees_every_slot(variants):
  # Long-running requests (cancelled below) keep both slots busy while the others queue.
  cfg = EngineConfig(batch_size=2, kv_slots=2, max_seq_len=128, prefill_chunk=16, length_buckets=(16,),
                     max_waiting=2, warmup=False)
  with Engine(variants[1][:1], sharing=True, mesh_shape=(1, 1), config=cfg) as engine:
    running = [engine.submit("v0", PROMPTS[0], max_new_tokens=120) for _ in range(2)]
    for h in running:
      next(iter(h))  # admitted and running: both slots taken, the admission queue empty
    queued = [engine.submit("v0", PROMPTS[1], max_new_tokens=4) for _ in range(2)]
    with pytest.raises(OverloadedError, match="admission queue is full"):
      engine.submit("v0", PROMPTS[1], max_new_tokens=4)
    assert all(b["kv_slots_free"] == 0 for b in engine.stats()["blocks"] if b["kind"] == "layers")
    for h in running:
      h.cancel()
    assert [len(h.result(120)) for h in queued] == [4, 4]  # the queued ones got the freed slots
    assert all(h.finish_reason == "cancelled" for h in running)
    stats = engine.stats()
    assert all(b["kv_slots_used"] == 0 and b["kv_slots_free"] == 2
               for b in stats["blocks"] if b["kind"] == "layers")
    assert stats["requests"]["active"] == 0


def test_bad_requests_are_rejected(shared_engine):
  with pytest.raises(NotFoundError):
    shared_engine.submit("nope", [1, 2])
  with pytest.raises(InvalidRequestError, match="max_tokens"):
    shared_engine.submit("v0", [1, 2], max_new_tokens=63)
  with pytest.raises(InvalidRequestError, match="prompt"):
    shared_engine.submit("v0", [])


def test_trace_text_names_blocks_and_models(shared_engine):
  text = shared_engine.trace_text(last=5)
  assert text.splitlines()[0].split()[:3] == ["batch", "kind", "block"]
  assert len(text.splitlines()) == 6


def test_per_block_kv_slots_and_batch_size(variants):
  specs = variants[1]
  shared_layer = specs[0].block_ids[1]
  cfg = EngineConfig(batch_size=2, kv_slots=3, max_seq_len=64, prefill_chunk=16, length_buckets=(16,),
                     warmup=False, kv_slots_by_block=((shared_layer[:16], 9),),
                     batch_size_by_block=((shared_layer, 6),))
  with Engine(specs, sharing=True, mesh_shape=(1, 1), config=cfg) as engine:
    blocks = {b["block_id"]: b for b in engine.stats()["blocks"]}
    assert blocks[shared_layer]["kv_slots_free"] == 9 and blocks[shared_layer]["batch_size"] == 6
    other = specs[0].block_ids[2]
    assert blocks[other]["kv_slots_free"] == 3 and blocks[other]["batch_size"] == 2


# ---- per-row sampling controls and logprobs (jblock.runtime.logits, head_rows) ---------------

def _torch_logprobs(variants, model: int, tokens: list[int]) -> torch.Tensor:
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(variants[0][model],
                                                                  dtype=torch.float32).eval()
  with torch.no_grad():
    return torch.log_softmax(torch_model(torch.tensor([tokens])).logits[0].float(), -1)


def test_logprobs_and_prompt_logprobs_match_transformers(shared_engine, variants, expected):
  prompt = [int(t) for t in PROMPTS[3]]  # 19 tokens: two prefill chunks through the head
  plain = shared_engine.submit("v0", prompt, max_new_tokens=4)
  asks = shared_engine.submit("v0", prompt, max_new_tokens=4, logprobs=5, prompt_logprobs=2)
  tokens = asks.result(timeout=300)
  assert tokens == plain.result(timeout=300) == expected[3][:4]
  assert plain.logprobs() == [None] * 4 and plain.prompt_logprobs == []  # only rows that ask
  ref = _torch_logprobs(variants, 0, prompt + tokens)
  n = len(prompt)
  for i, got in enumerate(asks.logprobs()):
    assert got.token == tokens[i] and abs(got.logprob - ref[n - 1 + i, tokens[i]].item()) <= 1e-4
    values, ids = ref[n - 1 + i].topk(5)
    assert [t for t, _ in got.top] == ids.tolist()
    assert np.allclose([v for _, v in got.top], values.numpy(), atol=1e-4)
  lps = asks.prompt_logprobs
  assert len(lps) == n and lps[0] is None
  assert [lp.token for lp in lps[1:]] == prompt[1:]
  assert max(abs(lps[j].logprob - ref[j - 1, prompt[j]].item()) for j in range(1, n)) <= 1e-4
  assert all(len(lp.top) == 2 and lp.top[0][0] == ref[j - 1].argmax().item()
             for j, lp in enumerate(lps[1:], 1))


def _greedy_reference(variants, prompt, steps, process) -> list[int]:
  """Greedy tokens with `process(logits, generated)` applied to transformers' logits."""
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(variants[0][0],
                                                                  dtype=torch.float32).eval()
  out = []
  for _ in range(steps):
    with torch.no_grad():
      logits = torch_model(torch.tensor([prompt + out])).logits[0, -1].double()
    out.append(int(process(logits, out).argmax()))
  return out


def test_penalties_and_logit_bias_match_their_definitions(shared_engine, variants):
  prompt = [int(t) for t in PROMPTS[0]]

  def penalised(logits, generated):
    for t in set(prompt + generated):  # repetition: transformers' RepetitionPenaltyLogitsProcessor
      logits[t] = logits[t] / 1.3 if logits[t] > 0 else logits[t] * 1.3
    for t in set(generated):  # OpenAI's presence and frequency
      logits[t] -= 0.4 + 0.7 * generated.count(t)
    logits[5] += 2.5
    return logits

  got = shared_engine.submit("v0", prompt, max_new_tokens=8, repetition_penalty=1.3,
                             presence_penalty=0.4, frequency_penalty=0.7,
                             logit_bias={"5": 2.5}).result(timeout=300)
  assert got == _greedy_reference(variants, prompt, 8, penalised)
  forced = shared_engine.submit("v0", prompt, max_new_tokens=3, logit_bias={9: 100})
  assert forced.result(timeout=300) == [9, 9, 9]


def test_min_tokens_holds_back_the_stop_ids_and_min_p_one_is_greedy(shared_engine, expected):
  first = expected[1][0]
  stopped = shared_engine.submit("v1", PROMPTS[1], max_new_tokens=4, stop_token_ids=[first])
  assert stopped.result(timeout=300) == [] and stopped.finish_reason == "stop"
  held = shared_engine.submit("v1", PROMPTS[1], max_new_tokens=4, stop_token_ids=[first],
                              min_tokens=2).result(timeout=300)
  assert len(held) >= 2 and held[0] != first
  top_only = shared_engine.submit("v1", PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=5,
                                  min_p=1.0).result(timeout=300)
  assert top_only == expected[1][:6]


class _OnlyTokens:
  """A constraint allowing a fixed set of tokens (what a grammar's mask does), recording what
  the engine reports."""

  def __init__(self, allowed, vocab):
    self.width = -(-vocab // 32)
    self.allowed, self.accepted = allowed, []

  def mask(self):
    bits = np.zeros(self.width * 32, bool)
    bits[list(self.allowed)] = True
    return np.packbits(bits.reshape(-1, 32)[:, ::-1], axis=1).view(">u4").astype(np.uint32).view(
        np.int32)[:, 0]

  def accept(self, token):
    self.accepted.append(token)
    return token in self.allowed

  def finished(self):
    return False


def test_a_constraint_masks_every_step_and_greedy_picks_its_best_allowed_token(
    shared_engine, variants):
  prompt = [int(t) for t in PROMPTS[2]]
  allowed = {3, 17, 40}
  constraint = _OnlyTokens(allowed, 128)
  got = shared_engine.submit("v0", prompt, max_new_tokens=5,
                             constraint=constraint).result(timeout=300)

  def masked(logits, generated):
    out = torch.full_like(logits, -torch.inf)
    out[list(allowed)] = logits[list(allowed)]
    return out

  assert got == constraint.accepted == _greedy_reference(variants, prompt, 5, masked)


def test_bad_sampling_controls_are_refused_naming_the_field(shared_engine):
  for kwargs, field in (({"logprobs": 21}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty"),
                        ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"logit_bias": {100000: 1}}, "logit_bias"),
                        ({"logit_bias": {3: 101}}, "logit_bias"), ({"min_p": 1.5}, "min_p"),
                        ({"min_tokens": 9, "max_new_tokens": 4}, "min_tokens")):
    with pytest.raises(InvalidRequestError) as e:
      shared_engine.submit("v0", [1, 2, 3], **kwargs)
    assert e.value.field == field, kwargs
