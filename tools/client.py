"""Command-line client of a jblock server.

  python -m tools.client generate --server=HOST:PORT --model=NAME --prompt=TEXT
      [--max_tokens=N --temperature=T --top_p=P --top_k=K --seed=S --stop_token_ids=1,2
       --stop=STRING --api_key=KEY]
  python -m tools.client generate --server=HOST:PORT --model=NAME --prompt_tokens=1,2,3
  python -m tools.client list --server=HOST:PORT
  python -m tools.client stats|health --server=HOST:PORT
  python -m tools.client load|unload --server=HOST:PORT --model=NAME

generate streams the text to stdout (--output=tokens: the token ids) and the finish reason
and usage to stderr. --server defaults to 127.0.0.1:50051; the key (a server with tenants)
comes from --api_key or $JBLOCK_API_KEY. A server that cannot be reached is retried for
--retry_s (a generate only until its first chunk). A gRPC error prints "ERROR <STATUS>: <message>" to stderr, exit 1.
"""

import json
import os
import sys

from absl import app
from absl import flags
import grpc

from jblock.client import Client
from launch.console import run_script

_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "host:port of the jblock server.")
_API_KEY = flags.DEFINE_string("api_key", os.environ.get("JBLOCK_API_KEY"),
                               "API key (tenant or admin); default: $JBLOCK_API_KEY.")
_MODEL = flags.DEFINE_string("model", None, "Model name (generate, load, unload).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_TOKENS = flags.DEFINE_list("prompt_tokens", None, "Prompt token ids, comma-separated.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Tokens to generate (server default 32).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy (the default).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1]; 1 = off.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k likeliest tokens; 0 = off.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.", lower_bound=0)
_STOP_TOKEN_IDS = flags.DEFINE_list("stop_token_ids", [], "Token ids that end generation.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable): the text ends before it.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Deadline of the call in seconds.")
_RETRY_S = flags.DEFINE_float(
    "retry_s", 30.0, "How long to retry a server that cannot be reached (restarting): list, "
    "stats, health, and a generate that has streamed nothing yet. 0 = never.", lower_bound=0.0)
_OUTPUT = flags.DEFINE_enum("output", "text", ["text", "tokens"], "What generate prints.")

COMMANDS = ("generate", "list", "stats", "health", "load", "unload")


def _token_ids(flag: flags.FlagHolder) -> list[int]:
  try:
    return [int(v) for v in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name} must be comma-separated integers, got {flag.value}")


def _required_model(command: str) -> str:
  if not _MODEL.value:
    raise app.UsageError(f"--model is required for {command}")
  return _MODEL.value


def _generate(client: Client) -> None:
  model = _required_model("generate")
  if (_PROMPT.value is None) == (_PROMPT_TOKENS.value is None):
    raise app.UsageError("generate needs exactly one of --prompt and --prompt_tokens")
  prompt_tokens = _token_ids(_PROMPT_TOKENS) if _PROMPT_TOKENS.value is not None else None
  stream = client.generate(
      model, _PROMPT.value, prompt_tokens=prompt_tokens, max_tokens=_MAX_TOKENS.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value,
      stop_token_ids=_token_ids(_STOP_TOKEN_IDS), stop=_STOP.value, timeout=_TIMEOUT.value)
  with stream:
    for chunk in stream:
      if _OUTPUT.value == "tokens":
        sys.stdout.write("".join(f"{t} " for t in chunk.token_ids))
      else:
        sys.stdout.write(chunk.text)
      sys.stdout.flush()
      if chunk.finish_reason is not None:
        sys.stdout.write("\n")
        print(f"[finish_reason={chunk.finish_reason} prompt_tokens={chunk.usage.prompt_tokens} "
              f"completion_tokens={chunk.usage.completion_tokens}]", file=sys.stderr)


def _list(client: Client) -> None:
  for model in client.list_models(timeout=_TIMEOUT.value):
    print(f"{model.name}\tfamily={model.family}\tvocab={model.vocab_size}\t"
          f"max_seq_len={model.max_seq_len}\tblocks={len(model.chain)}\t"
          f"tokenizer={'yes' if model.has_tokenizer else 'no'}" +
          (f"\tbase={model.base_model}" if model.base_model else ""))


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)} (got {argv[1:]})")
  command = argv[1]
  try:
    with Client(_SERVER.value, api_key=_API_KEY.value, retry_s=_RETRY_S.value) as client:
      if command == "generate":
        _generate(client)
      elif command == "list":
        _list(client)
      elif command == "stats":
        print(json.dumps(client.stats(timeout=_TIMEOUT.value), indent=2, sort_keys=True))
      elif command == "health":
        print(client.health(timeout=_TIMEOUT.value))
      elif command == "load":
        print(client.load_model(_required_model("load"), timeout=_TIMEOUT.value))
      elif command == "unload":
        client.unload_model(_required_model("unload"), timeout=_TIMEOUT.value)
  except grpc.RpcError as e:
    sys.stdout.flush()
    print(f"ERROR {e.code().name}: {e.details()}", file=sys.stderr)
    sys.exit(1)


def console() -> None:
  """The jblock-client console script."""
  run_script(main, __name__)


if __name__ == "__main__":
  console()
