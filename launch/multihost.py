"""Runs one model of a zoo on a mesh spanning several processes (jax.distributed); start one per
process, same flags except --process_id:

  python -m launch.multihost --dist_coordinator=127.0.0.1:50070 --num_processes=2 --process_id=0 \
      --local_devices=2 --zoo=checkpoints/zoo --model=base --prompt=1,2,3 --prompt=4,5 \
      --max_new_tokens=8 --output=out.json

Process 0 prints (and with --output writes) the new tokens and the logits behind them as JSON.
"""

import json
import signal

from absl import app
from absl import flags

_COORDINATOR = flags.DEFINE_string("dist_coordinator", None,
                                   "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the mesh.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank.", lower_bound=0)
_LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 0, "CPU devices per process; 0 = default.",
                                      lower_bound=0)
_TIMEOUT_S = flags.DEFINE_integer("dist_timeout_s", 60, "Seconds to wait for every process.",
                                  lower_bound=1)
_COLLECTIVES_HOST = flags.DEFINE_string(
    "collectives_host", None, "Address gloo's collective sockets bind; default: the coordinator's "
    "host when it is loopback, else the address this host's name resolves to.")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory (same on every process).")
_MODEL = flags.DEFINE_string("model", None, "Model of the zoo to run.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", [], "data,model mesh over all processes' devices; "
                                "empty = all on model.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Comma-separated token ids; repeat per prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate per prompt.",
                                       lower_bound=1)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 128, "Prompt + generated tokens.", lower_bound=2)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed of the first prompt (+1 per prompt).")
_VERIFY = flags.DEFINE_boolean("verify_blocks", True, "Process 0 checks every block's hash on "
                               "the host before the shards are restored.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file process 0 writes the result to.")
flags.mark_flags_as_required(["dist_coordinator", "model"])


def _prompts() -> list[list[int]]:
  if not _PROMPTS.value:
    raise app.UsageError("--prompt: give at least one prompt (comma-separated token ids)")
  try:
    return [[int(t) for t in p.split(",")] for p in _PROMPTS.value]
  except ValueError:
    raise app.UsageError(f"--prompt must be comma-separated integers, got {_PROMPTS.value}")


def _mesh_shape():
  if not _MESH_SHAPE.value:
    return None
  try:
    shape = tuple(int(v) for v in _MESH_SHAPE.value)
  except ValueError:
    shape = ()
  if len(shape) != 2:
    raise app.UsageError(f"--mesh_shape must be two integers data,model; got {_MESH_SHAPE.value}")
  return shape


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  prompts, shape = _prompts(), _mesh_shape()
  from jblock.cluster import multihost
  config = multihost.DistributedConfig(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value, _LOCAL_DEVICES.value, _TIMEOUT_S.value,
                                       _COLLECTIVES_HOST.value)
  try:
    config.validate()
  except ValueError as e:
    field, message = str(e).split(" ", 1)  # the field's name first, as the flag's below
    flag = {"coordinator_address": "dist_coordinator", "timeout_s": "dist_timeout_s"}.get(field,
                                                                                       field)
    raise app.UsageError(f"--{flag} {message}")
  # JAX's coordination client aborts the process (no Python exception) when a peer does not
  # join in time or stops sending heartbeats: this line tells the log what it was waiting for.
  print(f"jblock: joining the mesh at {config.coordinator_address} as process "
        f"{config.process_id} of {config.num_processes} (waiting up to {config.timeout_s} s)",
        flush=True)
  multihost.initialize(config)
  # jax.distributed installs a SIGTERM handler (preemption sync) that only records the signal:
  # a process waiting in a collective for a dead peer would then ignore it. Default disposition:
  # SIGTERM ends the process even inside a blocked collective.
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  from jblock.errors import JBlockError
  from jblock.zoo.cli import quiet_libraries
  from jblock.zoo.store import Zoo
  quiet_libraries()
  try:
    mesh = multihost.global_mesh(shape)
  except ValueError as e:
    raise app.UsageError(f"--mesh_shape: {e}")
  try:
    chain = multihost.MeshChain(Zoo(_ZOO.value), _MODEL.value, mesh, batch_size=len(prompts),
                                max_seq_len=_MAX_SEQ_LEN.value, verify=_VERIFY.value)
  except (JBlockError, ValueError) as e:  # every process reads the same zoo: all stop alike
    raise app.UsageError(f"--zoo={_ZOO.value} --model={_MODEL.value}: {e}")
  try:
    out = chain.generate(prompts, _MAX_NEW_TOKENS.value, _TEMPERATURE.value, _SEED.value)
  except ValueError as e:
    raise app.UsageError(f"--prompt/--max_new_tokens: {e}")
  local, total = chain.param_bytes()
  result = {"process_id": _PROCESS_ID.value, "mesh": multihost.describe(mesh),
            "tokens": out.tokens, "logits": out.logits.tolist(), "step_s": out.step_s,
            "local_param_bytes": local, "global_param_bytes": total}
  # Every process reports its own share of the params; process 0 also the result.
  print(json.dumps({"process_id": _PROCESS_ID.value, "local_param_bytes": local,
                    "global_param_bytes": total}), flush=True)
  if _PROCESS_ID.value == 0:
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        json.dump(result, f)
    print(json.dumps({"tokens": out.tokens}), flush=True)
  multihost.shutdown()


if __name__ == "__main__":
  app.run(main)
