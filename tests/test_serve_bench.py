"""The serve bench's workload and per-model comparison (no engine: those run in the bench)."""

import numpy as np

from jblock.bench import serve_bench
from jblock.train import pareto


def test_workload_prompts_come_from_the_held_out_tail_and_repeat_per_seed():
  jobs = serve_bench.workload(3, 2, prompt_len=16, holdout=0.15, seed=5)
  assert sorted(i for i, _ in jobs) == [0, 0, 1, 1, 2, 2]
  tokens = pareto.corpus_tokens()
  tail = tokens[tokens.size - int(round(tokens.size * 0.15)):].tolist()
  text = bytes(tail)
  for _, prompt in jobs:
    assert len(prompt) == 16 and bytes(prompt) in text
  assert jobs == serve_bench.workload(3, 2, prompt_len=16, holdout=0.15, seed=5)
  assert jobs != serve_bench.workload(3, 2, prompt_len=16, holdout=0.15, seed=6)


def test_per_model_counts_identical_tokens_position_by_position():
  held = {"perplexity": 6.0, "perplexity_original": 6.5, "top1": 0.98, "kl": 0.002}
  assembled = [{"assembled": f"m{i}.a", "substitutions": [i], "holdout": held} for i in range(2)]
  jobs = [(0, [1]), (1, [2]), (0, [3])]
  served = {"per_model": [(jobs, [[1, 2, 3, 4], [5, 6], [7, 8]])],
            "assembled": [(jobs, [[1, 2, 9, 4], [5, 6], [7, 0]])],
            "assembled_fused": [(jobs, [[1, 2, 9, 4], [5, 0], [7, 8]])]}
  rows = serve_bench._per_model(["m0", "m1"], assembled, served)
  assert [r["served_token_agreement"] for r in rows] == [4 / 6, 1.0]
  assert [r["served_token_agreement_fused"] for r in rows] == [5 / 6, 0.5]
  assert rows[0]["perplexity_assembled"] == 6.0 and rows[1]["substitutions"] == [1]
  assert np.isclose(rows[0]["perplexity_original"], 6.5)
