"""engine_api (validation, RequestHandle) and MockEngine, without gRPC."""

import dataclasses
import threading

import pytest

from jblock.errors import InvalidRequestError, NotFoundError, OverloadedError, UnavailableError
from jblock.runtime import engine_api
from jblock.runtime.engine_api import ModelInfo, RequestHandle, SamplingParams
from jblock.runtime.mock_engine import MockEngine, mock_generate, mock_models, mock_next_token
from tests.serving.serving_helpers import kv_slots_used, wait_until

INFO = ModelInfo(name="m", family="mock", vocab_size=50, max_seq_len=64, chain=("e", "h"))


@pytest.mark.parametrize("prompt, params, field, phrase", [
    ([], SamplingParams(), "prompt", "empty"),
    ([1, 50], SamplingParams(), "prompt", "token id 50 at position 1"),
    ([-1], SamplingParams(), "prompt", "token id -1"),
    ([1.5], SamplingParams(), "prompt", "integers"),
    ([1], SamplingParams(max_new_tokens=0), "max_tokens", "must be positive, got 0"),
    ([1] * 10, SamplingParams(max_new_tokens=55), "max_tokens", "maximum sequence length 64"),
    # A prompt that fills the context is the prompt's fault, whatever max_tokens says.
    ([1] * 64, SamplingParams(max_new_tokens=1), "prompt", "64 tokens leave no room"),
    ([1] * 70, SamplingParams(), "prompt", "maximum sequence length 64"),
    ([1], SamplingParams(max_new_tokens=True), "max_tokens", "integer"),
    ([1], SamplingParams(max_new_tokens=10**400), "max_tokens", "...) exceeds the maximum"),
    ([1], SamplingParams(temperature=-0.1), "temperature", "[0, 100]"),
    ([1], SamplingParams(temperature=100.001), "temperature", "[0, 100]"),
    ([1], SamplingParams(temperature=1e300), "temperature", "[0, 100]"),
    ([1], SamplingParams(temperature=float("nan")), "temperature", "finite number, got nan"),
    ([1], SamplingParams(temperature=float("inf")), "temperature", "finite number, got inf"),
    ([1], SamplingParams(temperature=10**400), "temperature", "finite number, got 1000"),
    ([1], SamplingParams(temperature="0.5"), "temperature", "must be a number"),
    ([1], SamplingParams(temperature=True), "temperature", "must be a number"),
    ([1], SamplingParams(top_p=0.0), "top_p", "(0, 1]"),
    ([1], SamplingParams(top_p=-1e-50), "top_p", "(0, 1]"),
    ([1], SamplingParams(top_p=1.01), "top_p", "(0, 1]"),
    ([1], SamplingParams(top_p=float("nan")), "top_p", "finite"),
    ([1], SamplingParams(top_k=-1), "top_k", "[0, 2**31 - 1]"),
    ([1], SamplingParams(top_k=2**31), "top_k", "[0, 2**31 - 1]"),
    ([1], SamplingParams(top_k=2.0), "top_k", "integer"),
    ([1], SamplingParams(seed=2**64), "seed", "[0, 2**64 - 1]"),
    ([1], SamplingParams(seed=-1), "seed", "[0, 2**64 - 1]"),
    ([1], SamplingParams(seed=1.5), "seed", "integer"),
    ([1], SamplingParams(stop_token_ids=(3, 99)), "stop_token_ids", "token id 99"),
    ([1], SamplingParams(stop_token_ids=(1,) * 1025), "stop_token_ids", "at most 1024"),
])
def test_validate_request_names_the_field(prompt, params, field, phrase):
  with pytest.raises(InvalidRequestError) as e:
    engine_api.validate_request(INFO, prompt, params)
  assert e.value.field == field
  assert str(e.value).startswith(f"{field}: ")
  assert phrase in str(e.value)
  assert e.value.grpc_code == "INVALID_ARGUMENT"


def test_validate_request_accepts_the_edges():
  engine_api.validate_request(INFO, [0, 49] * 5, SamplingParams(max_new_tokens=6, top_p=1.0,
                                                                 temperature=0.0, top_k=0))
  engine_api.validate_request(INFO, [1], SamplingParams(max_new_tokens=63, top_p=1e-6,
                                                        temperature=2.0, top_k=5,
                                                        stop_token_ids=(0, 49)))
  # The documented ranges' other ends; a top_p that rounds to 0 in float32 is still > 0.
  engine_api.validate_request(INFO, [1], SamplingParams(temperature=100, top_p=1e-50,
                                                        top_k=2**31 - 1, seed=2**64 - 1,
                                                        stop_token_ids=(1,) * 1024))


def test_a_long_request_id_is_refused_naming_it():
  for ok in (None, "", "req-7", "é" * 128, "x" * engine_api.MAX_REQUEST_ID_BYTES):
    engine_api.validate_request_id(ok)
  for bad, phrase in (("x" * 257, "257 bytes"), ("é" * 129, "258 bytes"),
                      ("x" * 500_000, "at most 256 bytes"), ("a\nb", "printable"),
                      ("\ud800", "Unicode"), (7, "string")):
    with pytest.raises(InvalidRequestError) as e:
      engine_api.validate_request_id(bad)
    assert e.value.field == "request_id" and phrase in str(e.value), bad


def test_request_handle_streams_and_finishes():
  handle = RequestHandle("r1", "m", prompt_len=3)
  consumed = []
  reader = threading.Thread(target=lambda: consumed.extend(handle))
  reader.start()
  for token in (5, 6, 7):
    assert handle._emit(token)
  assert handle._finish(engine_api.LENGTH)
  reader.join(timeout=5)
  assert consumed == [5, 6, 7]
  assert handle.result(timeout=1) == [5, 6, 7]
  assert handle.finish_reason == "length"
  assert handle.submitted_at <= handle.first_token_at <= handle.finished_at
  # After the end, tokens and second finishes are dropped.
  assert not handle._emit(8)
  assert not handle._finish(engine_api.STOP)
  assert handle.tokens == [5, 6, 7] and handle.finish_reason == "length"


def test_request_handle_raises_the_engine_error_and_times_out():
  handle = RequestHandle("r2", "m", prompt_len=1)
  with pytest.raises(TimeoutError):
    handle.result(timeout=0.01)
  handle._emit(1)
  handle._finish(engine_api.ERROR, UnavailableError("worker gone"))
  with pytest.raises(UnavailableError, match="worker gone"):
    list(handle)
  with pytest.raises(UnavailableError):
    handle.result(timeout=1)
  with pytest.raises(ValueError):
    RequestHandle("r3", "m", 1)._finish(engine_api.ERROR)  # an error needs the exception


def test_request_handle_cancel_is_idempotent_and_calls_the_engine_once():
  calls = []
  handle = RequestHandle("r4", "m", prompt_len=1, on_cancel=calls.append)
  handle._emit(3)
  handle.cancel()
  handle.cancel()
  assert calls == [handle]
  assert handle.cancelled and handle.finish_reason == "cancelled"
  assert list(handle) == [3]  # a cancelled stream ends; it is not an error


def test_mock_engine_tokens_follow_the_formula_and_batching_does_not_change_them():
  info = mock_models(["x"], vocab_size=97, max_seq_len=64)["x"]
  engine = MockEngine({"x": info}, batch_size=4)
  try:
    prompts = [[i, i + 1, i + 2] for i in range(12)]
    handles = [engine.submit("x", p, max_new_tokens=20) for p in prompts]
    for prompt, handle in zip(prompts, handles):
      expected, reason = mock_generate(info, prompt, SamplingParams(max_new_tokens=20))
      assert handle.result(timeout=5) == expected
      assert handle.finish_reason == reason == "length"
      assert len(expected) == 20
    # The first token by hand: (1 + 2 + 3) * 31 + 0.
    assert engine.submit("x", [1, 2, 3], max_new_tokens=1).result(timeout=5) == [6 * 31 % 97]
    # Seeds change sampled (temperature > 0) outputs only.
    greedy = engine.submit("x", [1], max_new_tokens=5, seed=3).result(timeout=5)
    assert greedy == engine.submit("x", [1], max_new_tokens=5).result(timeout=5)
    sampled = engine.submit("x", [1], max_new_tokens=5, seed=3, temperature=1.0)
    assert sampled.result(timeout=5) != greedy
    blocks = engine.stats()["blocks"]
    assert all(b["batches_run"] > 0 and 0 < b["mean_occupancy"] <= 1 for b in blocks)
  finally:
    engine.close()


def test_mock_engine_stops_before_a_stop_or_eos_token():
  plain = ModelInfo(name="p", family="mock", vocab_size=97, max_seq_len=64, chain=("e", "h"))
  # This model's EOS is the first token of prompt [1, 2, 3].
  with_eos = dataclasses.replace(plain, name="s", eos_token_ids=(mock_next_token(6, 0, 97),))
  engine = MockEngine({"p": plain, "s": with_eos})
  try:
    handle = engine.submit("s", [1, 2, 3], max_new_tokens=10)
    assert handle.result(timeout=5) == [] and handle.finish_reason == "stop"
    full, reason = mock_generate(plain, [4], SamplingParams(max_new_tokens=10))
    assert reason == "length" and len(full) == 10
    stop_at = full[3]
    handle = engine.submit("p", [4], max_new_tokens=10, stop_token_ids=[stop_at])
    assert handle.result(timeout=5) == full[:full.index(stop_at)]
    assert handle.finish_reason == "stop"
  finally:
    engine.close()


def test_mock_engine_errors():
  engine = MockEngine(mock_models(["x"], vocab_size=10, max_seq_len=8))
  try:
    with pytest.raises(NotFoundError, match="'nope' is not loaded"):
      engine.submit("nope", [1])
    with pytest.raises(InvalidRequestError, match="max_tokens"):
      engine.submit("x", [1], max_new_tokens=8)
    with pytest.raises(NotFoundError, match="not in the zoo"):
      engine.load_model("nope")
  finally:
    engine.close()
  with pytest.raises(UnavailableError):
    engine.submit("x", [1])


def test_mock_engine_cancel_frees_kv_slots_and_admits_the_queue():
  infos = mock_models(["x"], vocab_size=97, max_seq_len=512)
  engine = MockEngine(infos, step_delay_s=0.01, kv_slots=1, max_queue=1)
  try:
    first = engine.submit("x", [1], max_new_tokens=400)
    second = engine.submit("x", [2], max_new_tokens=3)
    assert set(kv_slots_used(engine.stats()).values()) == {1}
    assert engine.stats()["queue_depth"] == 1
    with pytest.raises(OverloadedError, match="queue is full"):
      engine.submit("x", [3])
    assert next(iter(first)) == mock_generate(infos["x"], [1], SamplingParams(1))[0][0]
    first.cancel()
    assert first.finish_reason == "cancelled"
    # The queued request takes the freed slots and completes.
    expected, _ = mock_generate(infos["x"], [2], SamplingParams(max_new_tokens=3))
    assert second.result(timeout=5) == expected
    assert set(kv_slots_used(engine.stats()).values()) == {0}
    requests = engine.stats()["requests"]
    assert requests["cancelled"] == 1 and requests["completed"] == 1
    assert requests["rejected"] == 1 and requests["submitted"] == 2
  finally:
    engine.close()


def test_mock_engine_unload_drains_then_frees_unshared_blocks():
  infos = mock_models(["x", "y"], vocab_size=97, max_seq_len=128)
  engine = MockEngine(infos, step_delay_s=0.005)
  try:
    handle = engine.submit("x", [1], max_new_tokens=30)
    unloader = threading.Thread(target=engine.unload_model, args=("x",))
    unloader.start()
    # While draining (about 150 ms), x is no longer listed and admits nothing.
    wait_until(lambda: "x" not in [i.name for i in engine.list_models()])
    with pytest.raises(UnavailableError, match="being unloaded"):
      engine.submit("x", [1])
    unloader.join(timeout=5)
    assert not unloader.is_alive()
    expected, _ = mock_generate(infos["x"], [1], SamplingParams(max_new_tokens=30))
    assert handle.result(timeout=1) == expected  # drained, not cancelled
    assert [i.name for i in engine.list_models()] == ["y"]
    blocks = {b["block_id"]: b["models"] for b in engine.stats()["blocks"]}
    assert blocks == {"mock-embed": ["y"], "mock-layers-0": ["y"], "mock-layers-1-y": ["y"],
                      "mock-head-y": ["y"]}
    with pytest.raises(NotFoundError):
      engine.submit("x", [1])
    # Back from the zoo.
    assert engine.load_model("x") == infos["x"]
    assert engine.submit("x", [1], max_new_tokens=30).result(timeout=5) == expected
  finally:
    engine.close()


def test_mock_engine_close_fails_outstanding_requests():
  engine = MockEngine(mock_models(["x"], max_seq_len=512), step_delay_s=0.01)
  handle = engine.submit("x", [1], max_new_tokens=400)
  engine.close()
  assert handle.finish_reason == "error"
  with pytest.raises(UnavailableError, match="engine closed"):
    handle.result(timeout=1)


def test_mock_engine_is_an_engine():
  engine = MockEngine(mock_models(["x"]))
  try:
    assert isinstance(engine, engine_api.Engine)
  finally:
    engine.close()
