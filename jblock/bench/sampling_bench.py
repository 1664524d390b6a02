"""What the per-row sampling controls cost: closed-batch decode with logprobs, penalties or a
grammar on every row, and plain rows batched with grammar rows, each against plain rows.

One random Llama-layout checkpoint (engine_bench's shapes) and a byte-level BPE trained on the
demo corpus to the model's vocabulary size (the grammar needs a tokenizer). Every run is a
closed batch of `rows` requests generating `new_tokens` each (ignore_eos, and a grammar that
cannot complete sooner: a JSON string of at least 4,000 characters), greedy. Runs alternate
(plain, mode, plain, mode, ...) so both see the same machine; each pair gives a ratio. Every
mode runs once untimed first, so its compiled variants are not timed.
"""

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

from jblock.bench import engine_bench
from jblock.convert import convert
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
from jblock.train import demo

LONG_STRING = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"]}}}
MODES = ("logprobs", "penalties", "grammar", "mixed")


@dataclasses.dataclass(frozen=True)
class Job:
  shape: str = "gqa384"
  rows: int = 16
  new_tokens: int = 48
  prompt_len: int = 24
  pairs: int = 3


def _tokenizer(vocab: int, max_bytes: int = 8 << 20):
  """A byte-level BPE of `vocab` tokens (the model's rows), so the grammar masks a realistic
  vocabulary: trained on the Python sources of the standard library (the demo corpus is too
  small for more than ~1k tokens)."""
  texts, size = [demo.corpus_text()], 0
  for root, _, files in os.walk(os.path.dirname(os.__file__)):
    for name in sorted(files):
      if name.endswith(".py") and size < max_bytes:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
          texts.append(f.read())
        size += len(texts[-1])
  return demo.train_tokenizer("\n".join(texts), vocab)


def _submit(engine: Engine, prompt, job: Job, mode: str, row: int, grammar) -> Any:
  args = dict(max_new_tokens=job.new_tokens, ignore_eos=True)
  constrained = mode == "grammar" or (mode == "mixed" and row % 2 == 0)
  if mode == "logprobs":
    args["logprobs"] = 5
  elif mode == "penalties":
    args.update(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
  if constrained:
    args["constraint"] = grammar()
  return engine.submit("m", prompt, **args), constrained


def _run(engine: Engine, prompts, job: Job, mode: str, grammar) -> dict[str, float]:
  t0 = time.perf_counter()
  handles = [_submit(engine, p, job, mode, i, grammar) for i, p in enumerate(prompts)]
  tokens = {False: 0, True: 0}
  for handle, constrained in handles:
    tokens[constrained] += len(handle.result(600))
  wall = time.perf_counter() - t0
  return {"wall_s": wall, "tok_s": sum(tokens.values()) / wall,
          "plain_rows_tok_s": tokens[False] / wall if tokens[False] else None}


def run(job: Job, work_dir: str, progress: Callable = print) -> dict[str, Any]:
  from jblock.serving import grammar as grammar_lib  # the serving layer's grammar engine
  model_dir = engine_bench.checkpoint(work_dir, job.shape)
  vocab = engine_bench.SHAPES[job.shape].vocab
  progress(f"{job.shape}: training a {vocab}-token BPE for the grammar")
  tokenizer = _tokenizer(vocab)
  compiler = grammar_lib.GrammarCompiler(tokenizer, vocab, eos_ids=[0])
  compiled = compiler.compile(LONG_STRING)
  converted = convert(model_dir)
  config = EngineConfig(batch_size=job.rows, kv_slots=job.rows, max_seq_len=128,
                        prefill_chunk=32, length_buckets=(32,), warmup=True,
                        compilation_cache_dir=os.path.join(work_dir, "xla_cache"))
  engine = Engine([ModelSpec("m", converted.config, converted.blocks)], config=config)
  prompts = [[(7 * i + j) % vocab for j in range(job.prompt_len)] for i in range(job.rows)]
  new_grammar = lambda: compiler.constraint(compiled)  # noqa: E731
  out = {"job": dataclasses.asdict(job), "tokenizer_vocab": tokenizer.get_vocab_size(),
         "modes": {}}
  try:
    for mode in ("plain",) + MODES:
      _run(engine, prompts, job, mode, new_grammar)  # compiles its head variants
    for mode in MODES:
      pairs = []
      for i in range(job.pairs):
        plain = _run(engine, prompts, job, "plain", new_grammar)
        other = _run(engine, prompts, job, mode, new_grammar)
        pairs.append({"plain": plain, mode: other, "ratio": other["tok_s"] / plain["tok_s"]})
        if mode == "mixed":
          pairs[-1]["plain_rows_ratio"] = other["plain_rows_tok_s"] * 2 / plain["tok_s"]
        progress(f"{mode} pair {i + 1}: {other['tok_s']:.0f} vs plain {plain['tok_s']:.0f} "
                 f"tok/s ({pairs[-1]['ratio']:.3f}x)")
      out["modes"][mode] = {"pairs": pairs,
                            "median_ratio": statistics.median(p["ratio"] for p in pairs)}
      if mode == "mixed":
        out["modes"][mode]["median_plain_rows_ratio"] = statistics.median(
            p["plain_rows_ratio"] for p in pairs)
  finally:
    engine.close()
  out["table"] = table(out)
  return out


def table(result: dict[str, Any]) -> list[str]:
  rows = ["| rows carry | tok/s vs plain (median of pairs) | per pair |", "|---|---|---|"]
  names = {"logprobs": "logprobs k=5, every row", "penalties": "presence + frequency + "
           "repetition, every row", "grammar": "a JSON-schema grammar, every row",
           "mixed": "grammar on half the rows (plain rows' rate)"}
  for mode, r in result["modes"].items():
    key = "plain_rows_ratio" if mode == "mixed" else "ratio"
    median = r["median_plain_rows_ratio"] if mode == "mixed" else r["median_ratio"]
    rows.append(f"| {names[mode]} | {median:.3f}x | "
                f"{', '.join(f'{p[key]:.3f}' for p in r['pairs'])} |")
  return rows
