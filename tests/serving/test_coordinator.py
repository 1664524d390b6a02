"""The Inference and Admin services over real gRPC on 127.0.0.1, with MockEngine."""

import json
import threading

import grpc
import pytest

from jblock.runtime.engine_api import SamplingParams
from jblock.runtime.mock_engine import MockEngine, mock_generate
from jblock.serving import coordinator, text
from jblock.serving.metrics import ServingMetrics
from tests.serving.serving_helpers import kv_slots_used, wait_until


def _expected(info, prompt, **params):
  return mock_generate(info, prompt, SamplingParams(**params))


def _rpc_error(call) -> grpc.RpcError:
  with pytest.raises(grpc.RpcError) as e:
    call()
  return e.value


def test_streamed_tokens_equal_the_engines(serve, engine, catalog):
  client, _, _ = serve(engine)
  prompt = [5, 17, 42]
  chunks = list(client.generate("mock-ids", prompt_tokens=prompt, max_tokens=20, timeout=10))
  tokens = [t for chunk in chunks[:-1] for t in chunk.token_ids]
  expected, reason = _expected(catalog["mock-ids"], prompt, max_new_tokens=20)
  assert tokens == expected
  assert tokens == engine.submit("mock-ids", prompt, max_new_tokens=20).result(timeout=5)
  assert all(chunk.token_ids and chunk.finish_reason is None for chunk in chunks[:-1])
  last = chunks[-1]
  assert last.token_ids == () and last.finish_reason == reason == "length"
  assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 20)
  assert len({chunk.request_id for chunk in chunks}) == 1
  # No tokenizer: no text, and the caller's request id is used.
  assert all(chunk.text == "" for chunk in chunks)
  named = list(client.generate("mock-ids", prompt_tokens=prompt, max_tokens=2,
                               request_id="req-7", timeout=10))
  assert {chunk.request_id for chunk in named} == {"req-7"}


def test_sampling_params_and_stop_ids_reach_the_engine(serve, engine, catalog):
  client, _, _ = serve(engine)
  prompt = [1, 2]
  sampled = client.generate_tokens("mock-ids", prompt_tokens=prompt, max_tokens=8,
                                   temperature=0.7, top_p=0.9, top_k=5, seed=11, timeout=10)
  assert sampled == _expected(catalog["mock-ids"], prompt, max_new_tokens=8, temperature=0.7,
                              seed=11)[0]
  full, _ = _expected(catalog["mock-ids"], prompt, max_new_tokens=8)
  chunks = list(client.generate("mock-ids", prompt_tokens=prompt, max_tokens=8,
                                stop_token_ids=[full[4]], timeout=10))
  assert [t for c in chunks for t in c.token_ids] == full[:full.index(full[4])]
  assert chunks[-1].finish_reason == "stop"


def test_text_prompt_round_trips_through_the_tokenizer(serve, engine, catalog, tokenizer):
  client, _, _ = serve(engine)
  prompt_text = "hello world, hello blocks"
  prompt = text.encode(tokenizer, prompt_text)
  expected, _ = _expected(catalog["mock-a"], prompt, max_new_tokens=24)
  chunks = list(client.generate("mock-a", prompt_text, max_tokens=24, timeout=10))
  assert [t for c in chunks for t in c.token_ids] == expected
  assert chunks[-1].usage.prompt_tokens == len(prompt)
  streamed = "".join(chunk.text for chunk in chunks)
  assert streamed == tokenizer.decode(prompt + expected)[len(prompt_text):]
  assert not any(chunk.text.endswith("\ufffd") for chunk in chunks[:-1])
  assert client.generate_text("mock-a", prompt_text, max_tokens=24, timeout=10) == streamed


def test_concurrent_clients_get_their_own_tokens(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.005, batch_size=8)
  client, _, _ = serve(engine)
  n = 8
  results, errors = [None] * n, []
  barrier = threading.Barrier(n)

  def run(i):
    try:
      barrier.wait(timeout=5)
      model = ("mock-a", "mock-b")[i % 2]
      results[i] = client.generate_tokens(model, prompt_tokens=[i + 1, 2 * i + 3],
                                          max_tokens=30, timeout=20)
    except Exception as e:  # surfaced below
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=30)
  assert not errors
  for i in range(n):
    model = ("mock-a", "mock-b")[i % 2]
    assert results[i] == _expected(catalog[model], [i + 1, 2 * i + 3], max_new_tokens=30)[0]
  # Requests of both variants were batched together in their shared blocks.
  blocks = {b.block_id: b for b in client.stats_proto().blocks}
  assert blocks["mock-embed"].mean_occupancy > 1 / 8
  assert list(blocks["mock-embed"].models) == ["mock-a", "mock-b"]


BAD_REQUESTS = [
    # (generate kwargs, status, text the details must contain)
    (dict(model="nope", prompt_tokens=[1]), "NOT_FOUND", "model 'nope' not found"),
    (dict(model="", prompt_tokens=[1]), "INVALID_ARGUMENT", "model: is required"),
    (dict(model="mock-ids", prompt_tokens=[]), "INVALID_ARGUMENT", "prompt: is empty"),
    (dict(model="mock-a", prompt=""), "INVALID_ARGUMENT", "prompt: is empty"),
    (dict(model="mock-ids"), "INVALID_ARGUMENT", "prompt: is empty"),
    (dict(model="mock-ids", prompt_tokens=[3, 97]), "INVALID_ARGUMENT", "prompt: token id 97"),
    (dict(model="mock-ids", prompt="hi"), "INVALID_ARGUMENT", "prompt: model 'mock-ids' has no"),
    (dict(model="mock-ids", prompt_tokens=[1], max_tokens=0), "INVALID_ARGUMENT",
     "max_tokens: must be positive, got 0"),
    (dict(model="mock-ids", prompt_tokens=[1], max_tokens=-3), "INVALID_ARGUMENT",
     "max_tokens: must be positive"),
    (dict(model="mock-ids", prompt_tokens=[1] * 10, max_tokens=119), "INVALID_ARGUMENT",
     "max_tokens: prompt (10 tokens) + max_tokens (119) exceeds the maximum sequence length 128"),
    (dict(model="mock-ids", prompt_tokens=[1], temperature=-0.5), "INVALID_ARGUMENT",
     "temperature: must be in [0, 100]"),
    (dict(model="mock-ids", prompt_tokens=[1], top_p=0.0), "INVALID_ARGUMENT",
     "top_p: must be in (0, 1]"),
    (dict(model="mock-ids", prompt_tokens=[1], top_p=1.5), "INVALID_ARGUMENT",
     "top_p: must be in (0, 1], got 1.5"),
    (dict(model="mock-ids", prompt_tokens=[1], top_k=-1), "INVALID_ARGUMENT",
     "top_k: must be in [0, 2**31 - 1]"),
    (dict(model="mock-ids", prompt_tokens=[1], stop_token_ids=[500]), "INVALID_ARGUMENT",
     "stop_token_ids: token id 500"),
]


def test_every_bad_request_gets_its_status_and_the_server_keeps_serving(serve, engine, catalog):
  client, _, _ = serve(engine)
  for kwargs, status, phrase in BAD_REQUESTS:
    error = _rpc_error(lambda: list(client.generate(timeout=10, **kwargs)))
    assert error.code().name == status, kwargs
    assert phrase in error.details(), (kwargs, error.details())
  expected, _ = _expected(catalog["mock-ids"], [1, 2], max_new_tokens=5)
  assert client.generate_tokens("mock-ids", prompt_tokens=[1, 2], max_tokens=5,
                                timeout=10) == expected
  assert engine.stats()["requests"]["submitted"] == 1
  assert client.health() == "SERVING"


def test_overload_is_resource_exhausted(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.01, kv_slots=2, max_queue=1)
  client, _, _ = serve(engine)
  streams = []
  for i in range(3):  # one at a time: RPCs started together reach the engine in any order
    streams.append(client.generate("mock-ids", prompt_tokens=[i + 1], max_tokens=100,
                                   timeout=20))
    if i < 2:
      next(streams[-1])  # running, holding a slot
  wait_until(lambda: client.stats()["queue_depth"] == 1)  # the third waits in the queue
  error = _rpc_error(lambda: list(client.generate("mock-ids", prompt_tokens=[9], timeout=10)))
  assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert "admission queue is full" in error.details()
  # Freeing a slot admits the queued request, which streams its own tokens.
  streams[0].cancel()
  expected, _ = _expected(catalog["mock-ids"], [3], max_new_tokens=100)
  assert list(next(streams[2]).token_ids) == expected[:1]
  for stream in streams[1:]:
    stream.cancel()
  wait_until(lambda: set(kv_slots_used(client.stats()).values()) == {0})
  assert engine.stats()["requests"]["rejected"] == 1


def _requests_with_status(metrics, status) -> float:
  return metrics.registry.get_sample_value("jblock_requests_total", {"status": status}) or 0


def test_client_cancel_frees_the_kv_slots(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.01)
  metrics = ServingMetrics(engine)
  client, server, _ = serve(engine, metrics=metrics)
  stream = client.generate("mock-a", prompt_tokens=[1, 2], max_tokens=100, timeout=20)
  next(stream)
  used = kv_slots_used(client.stats())
  # KV lives in layers blocks (mock-ids, a chain without one, gets a private "mock-ids:kv").
  assert used == {"mock-layers-0": 1, "mock-layers-1-mock-a": 1, "mock-layers-1-mock-b": 0,
                  "mock-ids:kv": 0}
  stream.cancel()
  assert _rpc_error(lambda: list(stream)).code() == grpc.StatusCode.CANCELLED
  wait_until(lambda: set(kv_slots_used(client.stats()).values()) == {0})
  stats = client.stats()
  assert stats["requests"]["cancelled"] == 1 and stats["requests"]["running"] == 0
  wait_until(lambda: server.drain_state.in_flight == 0)
  wait_until(lambda: _requests_with_status(metrics, "CANCELLED") == 1)


def test_deadline_frees_the_kv_slots(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.01)
  metrics = ServingMetrics(engine)
  client, server, _ = serve(engine, metrics=metrics)
  chunks = []
  error = _rpc_error(lambda: chunks.extend(
      client.generate("mock-b", prompt_tokens=[4], max_tokens=100, timeout=0.3)))
  assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
  expected, _ = _expected(catalog["mock-b"], [4], max_new_tokens=100)
  received = [t for c in chunks for t in c.token_ids]
  assert 0 < len(received) < 100 and received == expected[:len(received)]
  wait_until(lambda: set(kv_slots_used(client.stats()).values()) == {0})
  assert client.stats()["requests"]["cancelled"] == 1
  wait_until(lambda: server.drain_state.in_flight == 0)
  wait_until(lambda: _requests_with_status(metrics, "DEADLINE_EXCEEDED") == 1)


def test_drain_finishes_in_flight_and_refuses_new_requests(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.01)
  client, server, _ = serve(engine)
  stream = client.generate("mock-ids", prompt_tokens=[8], max_tokens=40, timeout=20)
  first = next(stream)
  drained = []
  drainer = threading.Thread(target=lambda: drained.append(server.drain(timeout=10)))
  drainer.start()
  wait_until(lambda: client.health() == "DRAINING")
  error = _rpc_error(lambda: list(client.generate("mock-ids", prompt_tokens=[1], timeout=5)))
  assert error.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.details()
  rest = list(stream)
  tokens = list(first.token_ids) + [t for c in rest for t in c.token_ids]
  assert tokens == _expected(catalog["mock-ids"], [8], max_new_tokens=40)[0]
  assert rest[-1].finish_reason == "length"
  drainer.join(timeout=10)
  assert drained == [True]
  assert _rpc_error(lambda: client.health(timeout=2)).code() == grpc.StatusCode.UNAVAILABLE


def test_list_models_health_and_admin(serve, catalog):
  engine = MockEngine({"mock-a": catalog["mock-a"]}, zoo=catalog)
  client, _, _ = serve(engine)
  (model,) = client.list_models()
  assert (model.name, model.family, model.vocab_size, model.max_seq_len) == (
      "mock-a", "mock", catalog["mock-a"].vocab_size, 128)
  assert model.chain == catalog["mock-a"].chain and model.has_tokenizer
  loaded = client.load_model("mock-ids")
  assert loaded.name == "mock-ids" and not loaded.has_tokenizer
  assert [m.name for m in client.list_models()] == ["mock-a", "mock-ids"]
  assert _rpc_error(lambda: client.load_model("nope")).code() == grpc.StatusCode.NOT_FOUND
  client.unload_model("mock-a")
  assert [m.name for m in client.list_models()] == ["mock-ids"]
  assert [b.block_id for b in client.stats_proto().blocks] == ["ids-embed", "mock-ids:kv",
                                                               "ids-head"]
  error = _rpc_error(lambda: client.unload_model("mock-a"))
  assert error.code() == grpc.StatusCode.NOT_FOUND
  error = _rpc_error(lambda: client.load_model(""))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in error.details()


def test_stats_are_structured_and_json(serve, engine):
  client, _, _ = serve(engine)
  client.generate_tokens("mock-a", prompt_tokens=[1], max_tokens=4, timeout=10)
  response = client.stats_proto()
  as_dict = client.stats()
  assert [b.block_id for b in response.blocks] == [b["block_id"] for b in as_dict["blocks"]]
  embed = response.blocks[0]
  assert (embed.block_id, embed.kind, list(embed.models)) == (
      "mock-embed", "embed", ["mock-a", "mock-b"])
  assert embed.resident_bytes == 1 << 20 and embed.batch_size == 8
  assert embed.batches_run == 4 and embed.mean_occupancy == pytest.approx(1 / 8)
  assert (embed.kv_slots_used, embed.kv_slots_free, embed.placement) == (0, 0, "mock:0")
  shared = next(b for b in response.blocks if b.block_id == "mock-layers-0")
  assert (shared.kv_slots_used, shared.kv_slots_free) == (0, 16)  # the KV lives here
  assert response.requests["completed"] == 1 and response.queue_depth == 0
  assert as_dict["requests"]["completed"] == 1


def test_stats_proto_keeps_extra_fields_in_json_and_flattens_grouped_counters():
  stats = {"blocks": [{"block_id": "b1", "kind": "layers", "models": ["m"],
                       "resident_bytes": 10, "batch_size": 4, "batches_run": 2,
                       "mean_occupancy": 0.5, "kv_slots_used": 1, "kv_slots_free": 3,
                       "placement": {"devices": [0, 1]}, "kv_bytes": 99}],
           "queue_depth": 2, "mesh": {"data": 2},
           "requests": {"waiting": 2, "finished": {"stop": 3, "length": 1}}}
  response = coordinator.stats_proto(stats)
  (block,) = response.blocks
  assert (block.block_id, block.batches_run, block.kv_slots_free) == ("b1", 2, 3)
  assert block.placement == '{"devices": [0, 1]}'
  assert dict(response.requests) == {"waiting": 2, "finished.stop": 3, "finished.length": 1}
  assert json.loads(response.json) == stats


def test_an_engine_failure_mid_stream_reaches_the_client_as_its_status(serve, catalog):
  engine = MockEngine(catalog, step_delay_s=0.01)
  client, _, _ = serve(engine)
  stream = client.generate("mock-ids", prompt_tokens=[2], max_tokens=100, timeout=20)
  assert len(next(stream).token_ids) >= 1
  engine.close()
  error = _rpc_error(lambda: list(stream))
  assert error.code() == grpc.StatusCode.UNAVAILABLE and error.details() == "engine closed before the request finished"
  assert client.health() == "SERVING"  # the server itself is still up
