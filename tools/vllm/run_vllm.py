"""vLLM (CPU build) side of tools.engine_bench: runs in vLLM's own virtual environment.

  .venv-vllm/bin/python tools/vllm/run_vllm.py --model=DIR --prompts=FILE.json

Reads {"prompts": [[token ids]...], "max_tokens": N, "decode_tokens": M}, builds one `vllm.LLM`
on the Hugging Face checkpoint (float32, no tokenizer: token ids in, token ids out), warms it up
and prints READY. Then, for every line "run" on stdin, it runs the closed batch once and the
batch-1 decode once and prints one line `RESULT {json}` (so the caller can alternate it with
another system's runs). No jblock import: this file only needs vLLM.
"""

import argparse
import json
import time

import vllm_env  # this script's folder is on sys.path when it runs as a script

vllm_env.apply()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--prompts", required=True)
  parser.add_argument("--max_model_len", type=int, default=256)
  args = parser.parse_args()
  with open(args.prompts) as f:
    job = json.load(f)

  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt

  llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32",
            max_model_len=args.max_model_len, max_num_seqs=max(len(job["prompts"]), 1),
            seed=0)
  greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                    detokenize=False)
  prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

  def run(batch, n):
    t0 = time.perf_counter()
    outs = llm.generate(batch, greedy(n), use_tqdm=False)
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

  run(prompts, job["max_tokens"])  # warm-up: compiles and sizes everything once
  print("READY", flush=True)
  for line in iter(input_line, None):
    if line.strip() != "run":
      break
    wall, tokens = run(prompts, job["max_tokens"])
    m = job["decode_tokens"]  # batch 1: (time of 1 + M tokens - time of 1 token) / M
    t_one, _ = run(prompts[:1], 1)
    t_many, _ = run(prompts[:1], 1 + m)
    print("RESULT " + json.dumps({"wall_s": wall, "tokens": sum(map(len, tokens)),
                                  "outputs": tokens, "batch1_ms": 1e3 * (t_many - t_one) / m}),
          flush=True)


def input_line():
  try:
    return input()
  except EOFError:
    return None


if __name__ == "__main__":
  main()
