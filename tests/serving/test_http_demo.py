"""The official `openai` client against the real block engine on a demo-style zoo: greedy text
over HTTP equals the gRPC path's, for completions and chat, streamed or not."""

import openai
import pytest

from jblock.client import Client
from jblock.runtime.engine import Engine, EngineConfig
from jblock.serving import coordinator
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.train import demo

TINY = demo.DemoSpec(hidden=32, layers=4, heads=4, kv_heads=2, vocab_size=300, pretrain_steps=8,
                     finetune_steps=3, batch_size=4, seq_len=16)
PROMPTS = ["The sea", "Café naïve"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  zoo_dir = str(tmp_path_factory.mktemp("http_demo") / "zoo")
  demo.build_demo_zoo(zoo_dir, num_variants=2, progress=lambda _: None, spec=TINY)
  engine = Engine.from_zoo(zoo_dir, ["base", "variant-1", "variant-2"],
                           config=EngineConfig(batch_size=4, kv_slots=8, max_seq_len=64,
                                               prefill_chunk=16, length_buckets=(16,),
                                               warmup=False))
  frontend = Frontend(engine)
  grpc_server, grpc_port = coordinator.build_server(engine, 0, frontend=frontend)
  grpc_server.start()
  http = HttpServer(frontend, 0)
  http.start()
  try:
    yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http.port}/v1"
  finally:
    http.stop()
    grpc_server.stop(0).wait(5)
    frontend.close()
    engine.close()


def test_openai_greedy_text_equals_grpc(served):
  target, base_url = served
  oa = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
  try:
    assert sorted(m.id for m in oa.models.list().data) == ["base", "variant-1", "variant-2"]
    with Client(target) as client:
      for model, prompt in (("base", PROMPTS[0]), ("variant-2", PROMPTS[0]),
                            ("variant-2", PROMPTS[1])):
        expected = client.generate_text(model, prompt, max_tokens=12, timeout=120)
        assert expected
        got = oa.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected, (model, prompt)
        stream = oa.completions.create(model=model, prompt=prompt, max_tokens=12, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected
      messages = [{"role": "user", "content": "Tell me about the garden"}]
      expected = client.generate_text("variant-1", messages=messages, max_tokens=10, timeout=120)
      chat = oa.chat.completions.create(model="variant-1", messages=messages, max_tokens=10)
      assert chat.choices[0].message.content == expected
      assert chat.usage.completion_tokens == 10 or chat.choices[0].finish_reason == "stop"
  finally:
    oa.close()
