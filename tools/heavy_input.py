"""The heavy-input attack against a running jblock server: a tenant's largest token gap while
others send multi-megabyte prompts (jblock/serving/heavy_input.py).

  python -m launch.serve --demo --max_request_bytes=8388608 &   # then:
  python -m tools.heavy_input --server=127.0.0.1:50051 --victim_model=variant-1 \
      --attacker_model=variant-2 --server_pid=$! --out=tools/results/heavy_input.json
"""

import json

from absl import app
from absl import flags

from jblock.serving import heavy_input

_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "gRPC host:port.")
_HTTP = flags.DEFINE_string("http", None, "HTTP base URL (…/v1), for --protocol=http.")
_PROTOCOL = flags.DEFINE_enum("protocol", "grpc", ["grpc", "http"], "How attackers send.")
_VICTIM = flags.DEFINE_string("victim_model", "variant-1", "The victim's model.")
_ATTACKER = flags.DEFINE_string("attacker_model", "variant-2", "The attackers' model.")
_ATTACKERS = flags.DEFINE_integer("attackers", 4, "Attacking clients.", lower_bound=1)
_PROMPT_BYTES = flags.DEFINE_integer("prompt_bytes", 3_500_000, "Bytes per heavy prompt.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 60, "Tokens the victim streams.")
_VICTIM_KEY = flags.DEFINE_string("victim_key", None, "The victim's API key.")
_ATTACKER_KEY = flags.DEFINE_string("attacker_key", None, "The attackers' API key.")
_VICTIM_TIMEOUT_S = flags.DEFINE_float("victim_timeout_s", 120.0, "Deadline of the victim's stream.")
_SERVER_PID = flags.DEFINE_integer("server_pid", None, "Server pid, for its RSS growth.")
_OUT = flags.DEFINE_string("out", None, "Also write the result as JSON here.")
_LABEL = flags.DEFINE_string("label", "", "A label stored with the result.")


def main(argv):
  del argv
  result = heavy_input.measure(
      _SERVER.value, victim_model=_VICTIM.value, attacker_model=_ATTACKER.value,
      http_url=_HTTP.value, protocol=_PROTOCOL.value, attackers=_ATTACKERS.value,
      prompt_bytes=_PROMPT_BYTES.value, max_tokens=_MAX_TOKENS.value,
      victim_key=_VICTIM_KEY.value, attacker_key=_ATTACKER_KEY.value,
      server_pid=_SERVER_PID.value, victim_timeout_s=_VICTIM_TIMEOUT_S.value)
  result["label"] = _LABEL.value
  text = json.dumps(result, indent=2, sort_keys=True)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
