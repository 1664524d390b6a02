"""Makes N fine-tuned variants of a base model as Hugging Face checkpoints.

  python -m tools.make_variants --base_hf_dir=DIR --out_dir=DIR --n=3 --trainable_top_layers=1
  python -m tools.make_variants --init_config=family:llama,hidden:64,layers:4,heads:4,vocab:257 \
      --out_dir=DIR --n=3            # makes the base first, into DIR/base
  python -m tools.make_variants --base_hf_dir=DIR --out_dir=DIR --n=4 --lora \
      --lora_targets=q_proj,v_proj --lora_ranks=8,16   # PEFT adapters DIR/lora_1.. (trained)

The logic lives in jblock.train.variants; this script only reads flags.
"""

import os
import sys

from absl import app, flags

from jblock.train import variants

_BASE = flags.DEFINE_string("base_hf_dir", None, "HF checkpoint directory of the base model.")
_OUT = flags.DEFINE_string("out_dir", None, "Where variant_1..variant_N (and base/) are written.")
_N = flags.DEFINE_integer("n", 3, "Number of variants to make.")
_TOP = flags.DEFINE_integer("trainable_top_layers", 1,
                            "Decoder layers trained, counted from the top (partial fine-tune).")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per variant.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the base's init and each variant's data order.")
_FULL = flags.DEFINE_bool("full", False, "Train every tensor (embedding, all layers, head).")
_INIT = flags.DEFINE_string(
    "init_config", None,
    "Make a new random base into OUT_DIR/base first, e.g. family:llama,hidden:64,layers:4,"
    "heads:4,kv_heads:2,vocab:257 (keys: family, hidden, layers, heads, kv_heads, vocab, "
    "intermediate, max_positions, tie, experts; family: llama, qwen3, gemma2, gemma3, phi3, "
    "mixtral, gpt2).")
_CORPUS = flags.DEFINE_string("corpus", None,
                              "Text file to fine-tune on (split into N parts); needs the base's "
                              "tokenizer.json. Default: a distinct synthetic pattern per variant.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Training windows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 32, "Tokens per training window.")
_LORA = flags.DEFINE_bool("lora", False, "Make PEFT LoRA adapters (out_dir/lora_{1..n}) instead "
                          "of fine-tuned checkpoints (jblock.train.lora_train).")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", ["q_proj", "v_proj"],
                                  "HF module names the adapters target (e.g. c_attn for GPT-2).")
_LORA_RANKS = flags.DEFINE_list("lora_ranks", ["8"], "Adapter ranks, cycled over the adapters.")


class FlagError(Exception):
  """A bad flag value; the message starts with the flag's name."""


def _check(args: list[str]) -> tuple[str, variants.BaseSpec | None]:
  if len(args) > 1:
    raise FlagError(f"unexpected arguments: {' '.join(args[1:])}")
  if not _OUT.value:
    raise FlagError("--out_dir is required")
  if bool(_BASE.value) == bool(_INIT.value):
    raise FlagError("--base_hf_dir or --init_config is required (exactly one of them)")
  if _BASE.value and not os.path.isfile(os.path.join(_BASE.value, "config.json")):
    raise FlagError(f"--base_hf_dir={_BASE.value}: no config.json there")
  for flag, minimum in ((_N, 1), (_STEPS, 1), (_BATCH, 1), (_SEQ, 2)):
    if flag.value < minimum:
      raise FlagError(f"--{flag.name} must be >= {minimum}, got {flag.value}")
  if not _FULL.value and _TOP.value < 1:
    raise FlagError(f"--trainable_top_layers must be >= 1, got {_TOP.value}")
  if _LR.value <= 0:
    raise FlagError(f"--lr must be > 0, got {_LR.value}")
  if _CORPUS.value and not os.path.isfile(_CORPUS.value):
    raise FlagError(f"--corpus={_CORPUS.value}: no such file")
  spec = None
  if _INIT.value:
    try:
      spec = variants.parse_init_config(_INIT.value)
    except ValueError as e:
      raise FlagError(f"--init_config: {e}") from None
  layers = spec.layers if spec else _base_layers(_BASE.value)
  if not _FULL.value and _TOP.value > layers:
    raise FlagError(f"--trainable_top_layers={_TOP.value} exceeds the base's {layers} layers")
  return _BASE.value, spec


def _base_layers(base_dir: str) -> int:
  from jblock.convert.hf import read_hf_config
  from jblock.errors import JBlockError
  from jblock.models import config_from_hf
  try:
    return config_from_hf(read_hf_config(base_dir)).num_layers
  except JBlockError as e:
    raise FlagError(f"--base_hf_dir={base_dir}: {e}") from None


def _corpus_tokens(path: str, tokenizer_dir: str):
  tokenizer_file = os.path.join(tokenizer_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_file):
    raise FlagError(f"--corpus needs {tokenizer_file} to tokenize the text")
  from tokenizers import Tokenizer
  with open(path, encoding="utf-8") as f:
    return Tokenizer.from_file(tokenizer_file).encode(f.read()).ids


def main(argv: list[str]) -> None:
  try:
    base_dir, spec = _check(argv)
    if spec is not None:
      base_dir = variants.init_base(spec, os.path.join(_OUT.value, "base"), seed=_SEED.value)
      print(f"made base {base_dir}")
    if _LORA.value:
      from jblock.train.lora_train import make_lora_variants
      try:
        ranks = [int(r) for r in _LORA_RANKS.value]
        dirs = make_lora_variants(base_dir, _OUT.value, _N.value, _LORA_TARGETS.value, ranks,
                                  steps=_STEPS.value, seed=_SEED.value, lr=_LR.value,
                                  batch_size=_BATCH.value, seq_len=_SEQ.value)
      except ValueError as e:
        raise FlagError(f"--lora: {e}") from None
      print(f"wrote {len(dirs)} LoRA adapters under {_OUT.value}")
      return
    data = _corpus_tokens(_CORPUS.value, base_dir) if _CORPUS.value else None
    dirs = variants.make_variants(base_dir, _OUT.value, _N.value, _TOP.value, _STEPS.value,
                                  _SEED.value, full=_FULL.value, data=data, lr=_LR.value,
                                  batch_size=_BATCH.value, seq_len=_SEQ.value)
  except FlagError as e:
    _fail(str(e))
  print(f"wrote {len(dirs)} variants under {_OUT.value}")


def _fail(message: str) -> None:
  sys.stderr.write(f"make_variants: error: {message}\n")
  sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
  # One line naming the flag instead of absl's multi-line usage dump.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
