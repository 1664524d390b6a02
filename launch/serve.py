"""All-in-one jblock server: gRPC and OpenAI-compatible HTTP over an in-process block engine.

  python -m launch.serve --demo                         # builds checkpoints/zoo on first run
  python -m launch.serve --zoo=DIR --models=a,b --port=50051 --http_port=8000 --metrics_port=9090
  python -m launch.serve --tenants=tenants.json --host=0.0.0.0   # keys, quotas; all interfaces
  python -m launch.serve --engine=mock                  # fake tokens, no model (tests)

Without --tenants the server is open and listens on 127.0.0.1 only.
--tls_cert/--tls_key/--tls_ca: the gRPC and HTTP ports speak TLS with that certificate.
SIGTERM or SIGINT: stop accepting requests, finish the in-flight ones, exit 0.
"""

from absl import app
from absl import flags

from jblock.zoo.cli import quiet_libraries
from launch import cluster_flags
from launch.console import run_script
from launch import engine_flags
from jblock.serving import frontend
from jblock.serving import server

_HOST = flags.DEFINE_string("host", "127.0.0.1",
                            "Address to listen on (0.0.0.0: all; needs --tenants).")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port; 0 picks a free one.", lower_bound=0)
_HTTP_PORT = flags.DEFINE_integer("http_port", 8000,
                                  "OpenAI-compatible HTTP port; 0 picks a free one, -1 = off.",
                                  lower_bound=-1)
_METRICS_PORT = flags.DEFINE_integer(
    "metrics_port", 0, "Prometheus port; 0 = off. Per-tenant series need the admin key; without "
    "--tenants it listens on 127.0.0.1 only.", lower_bound=0)
_TENANTS = flags.DEFINE_string("tenants", None,
                               "Tenants JSON file (API key hashes, models, quotas); unset = an "
                               "open server on 127.0.0.1 only.")
_MAX_REQUEST_BYTES = flags.DEFINE_integer(
    "max_request_bytes", frontend.DEFAULT_MAX_REQUEST_BYTES,
    "Largest HTTP body / gRPC message accepted.", lower_bound=1024)
_TOKENIZE_WORKERS = flags.DEFINE_integer("tokenize_workers", 2,
                                         "Threads that tokenise prompts.", lower_bound=1)
_MAX_WORKERS = flags.DEFINE_integer(
    "max_workers", 0, "Concurrent RPCs served (a thread each); 0 = sized from the engine's "
    "admission limit (--max_waiting plus running requests), so its queue bounds the streams.",
    lower_bound=0)
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0,
                                      "On SIGTERM, how long in-flight requests may finish.")
_TOOL_CALL_PARSER = flags.DEFINE_enum(
    "tool_call_parser", "hermes", ["hermes", "llama3_json"],
    "How chat outputs become tool_calls: hermes = <tool_call>{json}</tool_call> blocks (Qwen, "
    "Hermes, the demo template); llama3_json = Llama 3's bare {\"name\", \"parameters\"} JSON.")
flags.adopt_module_key_flags(engine_flags)  # the engine's flags show in --help too


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  from jblock.errors import JBlockError
  try:
    tenants = frontend.tenants_from_flag(_TENANTS.value)
  except JBlockError as e:
    raise app.UsageError(str(e))
  tls = cluster_flags.given_credentials()
  if tls.token is not None:
    raise app.UsageError("--cluster_token_file: launch.serve has no cluster; its callers "
                         "present API keys (--tenants)")
  engine = engine_flags.build_engine()
  server.serve(engine, _PORT.value, _METRICS_PORT.value, host=_HOST.value,
               max_workers=_MAX_WORKERS.value or None, drain_timeout_s=_DRAIN_TIMEOUT_S.value,
               http_port=None if _HTTP_PORT.value < 0 else _HTTP_PORT.value, tenants=tenants,
               max_request_bytes=_MAX_REQUEST_BYTES.value,
               tokenize_workers=_TOKENIZE_WORKERS.value, tls=tls,
               tool_call_parser=_TOOL_CALL_PARSER.value)


def run():
  """The jblock-serve console script."""
  run_script(main, __name__)


if __name__ == "__main__":
  run()
