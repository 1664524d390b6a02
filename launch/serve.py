"""All-in-one jblock server: the coordinator's gRPC API over an in-process engine.

  python -m launch.serve --engine=mock --port=50051 --metrics_port=9090

SIGTERM or SIGINT: stop accepting requests, finish the in-flight ones, exit 0.
"""

from absl import app
from absl import flags

from jblock.runtime.mock_engine import MockEngine, mock_models
from jblock.serving import server

_ENGINE = flags.DEFINE_enum("engine", "mock", ["mock"],
                            "mock: fake deterministic tokens (no model), for tests and demos.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port; 0 picks a free one.", lower_bound=0)
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 0, "Prometheus port; 0 = off.",
                                     lower_bound=0)
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 64, "Concurrent RPCs served.", lower_bound=1)
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0,
                                      "On SIGTERM, how long in-flight requests may finish.")
_MOCK_MODELS = flags.DEFINE_list("mock_models", ["mock-a", "mock-b"], "Mock model names.")
_MOCK_VOCAB_SIZE = flags.DEFINE_integer("mock_vocab_size", 256, "Mock vocabulary size.")
_MOCK_MAX_SEQ_LEN = flags.DEFINE_integer("mock_max_seq_len", 256, "Mock maximum length.")
_MOCK_STEP_DELAY_S = flags.DEFINE_float("mock_step_delay_s", 0.0, "Mock decode step time.")
_MOCK_KV_SLOTS = flags.DEFINE_integer("mock_kv_slots", 16, "KV slots per mock block.")
_MOCK_MAX_QUEUE = flags.DEFINE_integer("mock_max_queue", 64, "Mock admission queue bound.")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                     "Directory with tokenizer.json for the mock models.")


def build_engine():
  # Only the mock exists so far; the block engine from a zoo joins here.
  return MockEngine(
      mock_models(_MOCK_MODELS.value, vocab_size=_MOCK_VOCAB_SIZE.value,
                  max_seq_len=_MOCK_MAX_SEQ_LEN.value, tokenizer_dir=_TOKENIZER_DIR.value),
      step_delay_s=_MOCK_STEP_DELAY_S.value, kv_slots=_MOCK_KV_SLOTS.value,
      max_queue=_MOCK_MAX_QUEUE.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  server.serve(build_engine(), _PORT.value, _METRICS_PORT.value, host=_HOST.value,
               max_workers=_MAX_WORKERS.value, drain_timeout_s=_DRAIN_TIMEOUT_S.value)


if __name__ == "__main__":
  app.run(main)
