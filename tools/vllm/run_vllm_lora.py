"""vLLM (CPU build) multi-LoRA side of tools.lora_bench: runs in vLLM's own virtual environment.

  .venv-vllm/bin/python tools/vllm/run_vllm_lora.py --model=DIR --job=FILE.json

The job holds {"prompts": [[ids]...], "max_tokens": N, "max_loras": S, "max_lora_rank": R,
"runs": [{"adapters": n, "requests": [adapter dir or null per prompt]}...]}. One `vllm.LLM`
(enable_lora=True) serves every run; each prints `RESULT {json}`. No jblock import.
"""

import argparse
import json
import os
import time

import vllm_env  # this script's folder is on sys.path when it runs as a script

vllm_env.apply()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--job", required=True)
  parser.add_argument("--max_model_len", type=int, default=128)
  args = parser.parse_args()
  with open(args.job) as f:
    job = json.load(f)
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt
  from vllm.lora.request import LoRARequest

  llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32",
            max_model_len=args.max_model_len, max_num_seqs=len(job["prompts"]), seed=0,
            enable_lora=True, max_loras=job["max_loras"], max_lora_rank=job["max_lora_rank"],
            max_cpu_loras=max(job["max_loras"], max(r["adapters"] for r in job["runs"]) + 1))
  greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                          detokenize=False)
  prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
  ids: dict[str, int] = {}

  def request(path):
    if path is None:
      return None
    ids.setdefault(path, len(ids) + 1)
    return LoRARequest(os.path.basename(path), ids[path], path)

  for run in job["runs"]:
    loras = [request(p) for p in run["requests"]]
    llm.generate(prompts[:2], greedy, lora_request=loras[:2], use_tqdm=False)  # warm
    t0 = time.perf_counter()
    outs = llm.generate(prompts, greedy, lora_request=loras, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"adapters": run["adapters"], "wall_s": wall, "tokens": tokens,
                                  "tok_s": tokens / wall}), flush=True)


if __name__ == "__main__":
  main()
