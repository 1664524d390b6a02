"""lm-evaluation-harness as a real client of jblock's OpenAI API, checked against its own `hf` model.

lm-eval's `local-completions` model is how most people will score a jblock-served model: it sends
/v1/completions with `echo: true, logprobs: 1, max_tokens: 1` for loglikelihoods (a batch of
prompts, as token-id lists or as strings) and `stop` + `max_tokens` for generate_until, and reads
the answers in OpenAI's shape. This pins that the scores it gets from jblock are the scores lm-eval
gets running the same checkpoint in transformers (`hf`, float32 on the CPU): the same
multiple-choice acc and acc_norm, the per-choice loglikelihoods within 1e-4 (and the same
is_greedy), and the same greedy generations, byte for byte. Any drift in echo/prompt-logprob
offsets, batch ordering, stop handling or tokenisation of a string prompt shows up here as a
score lm-eval reports wrongly.

Everything is local: a small Llama base pre-trained briefly on the demo corpus (jblock.train.demo,
so its greedy text has sentences and stops), two tasks written as YAML beside JSONL data made from
that corpus, served in-process on 127.0.0.1. Runs in the eval environment (`make eval-check`:
.venv-eval, tools/eval/requirements.txt), not the project's .venv, which has no lm-eval.
"""

import json
import os
import random
import re

import pytest
import transformers

lm_eval = pytest.importorskip("lm_eval")  # only .venv-eval has it (make eval-check)
from lm_eval.tasks import TaskManager  # noqa: E402

from jblock.runtime.engine import Engine, EngineConfig  # noqa: E402
from jblock.serving.frontend import Frontend  # noqa: E402
from jblock.serving.http import HttpServer  # noqa: E402
from jblock.train import demo  # noqa: E402
from jblock.zoo.store import Zoo  # noqa: E402

SPEC = demo.DemoSpec(hidden=64, layers=2, heads=4, kv_heads=2, vocab_size=400,
                     pretrain_steps=150, batch_size=8, seq_len=32)
MODEL = "tiny-llama"
MC_TASK, GEN_TASK = "jblock_mc", "jblock_gen"
MC_EXAMPLES, GEN_EXAMPLES, CHOICES = 20, 10, 4
MAX_GEN_TOKENS = 24
LL_TOLERANCE = 1e-4


def _sentences() -> list[list[str]]:
  """The demo corpus's sentences as word lists (punctuation kept on its word)."""
  text = " ".join(demo.corpus_text().split())
  return [s.split() for s in re.split(r"(?<=\.) ", text) if len(s.split()) >= 8]


def _write_tasks(task_dir: str) -> None:
  """A multiple_choice task (the next word of a corpus sentence among 4) and a generate_until
  task (a sentence's start, generated until "." or a newline), as lm-eval YAML over JSONL."""
  rng = random.Random(0)
  sentences = _sentences()
  rng.shuffle(sentences)
  vocabulary = sorted({w.strip(".,;") for s in sentences for w in s if w.isalpha()})
  mc = []
  for words in sentences[:MC_EXAMPLES]:
    cut = rng.randrange(3, len(words) - 1)
    answer = words[cut].strip(".,;")
    wrong = rng.sample([w for w in vocabulary if w != answer], CHOICES - 1)
    choices = wrong + [answer]
    rng.shuffle(choices)
    mc.append({"context": " ".join(words[:cut]), "choices": choices,
               "label": choices.index(answer)})
  gen = [{"prompt": " ".join(words[:4]), "target": " " + " ".join(words[4:]).rstrip(".")}
         for words in sentences[MC_EXAMPLES:MC_EXAMPLES + GEN_EXAMPLES]]
  data = {MC_TASK: mc, GEN_TASK: gen}
  for name, rows in data.items():
    with open(os.path.join(task_dir, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  cache = os.path.join(task_dir, "datasets_cache")  # not ~/.cache: nothing left behind
  common = ("dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            "    test: {path}\n"
            f"  cache_dir: {cache}\n"
            "test_split: test\n")
  with open(os.path.join(task_dir, f"{MC_TASK}.yaml"), "w") as f:
    f.write(f"task: {MC_TASK}\n" + common.format(path=os.path.join(task_dir, f"{MC_TASK}.jsonl"))
            + "output_type: multiple_choice\n"
            "doc_to_text: '{{context}}'\n"
            "doc_to_choice: '{{choices}}'\n"
            "doc_to_target: '{{label}}'\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "  - metric: acc_norm\n")
  with open(os.path.join(task_dir, f"{GEN_TASK}.yaml"), "w") as f:
    f.write(f"task: {GEN_TASK}\n" + common.format(path=os.path.join(task_dir, f"{GEN_TASK}.jsonl"))
            + "output_type: generate_until\n"
            "doc_to_text: '{{prompt}}'\n"
            "doc_to_target: '{{target}}'\n"
            "generation_kwargs:\n"
            "  until: ['.', \"\\n\"]\n"
            f"  max_gen_toks: {MAX_GEN_TOKENS}\n"
            "  do_sample: false\n"
            "metric_list:\n"
            "  - metric: exact_match\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  """An HF Llama checkpoint with its fast tokenizer (tokenizer.json + tokenizer_config.json)."""
  path = str(tmp_path_factory.mktemp("lm_eval_model") / "base")
  demo.make_base(path, SPEC, progress=lambda _: None)
  return path


@pytest.fixture(scope="module")
def base_url(checkpoint, tmp_path_factory):
  zoo_dir = str(tmp_path_factory.mktemp("lm_eval_zoo"))
  Zoo(zoo_dir).convert(checkpoint, MODEL, dtype="float32", layers_per_block=1)
  engine = Engine.from_zoo(zoo_dir, [MODEL],
                           config=EngineConfig(batch_size=4, kv_slots=8, max_seq_len=128,
                                               prefill_chunk=64, length_buckets=(64,),
                                               warmup=False))
  frontend = Frontend(engine)
  http = HttpServer(frontend, 0)
  try:
    http.start()
    yield f"http://127.0.0.1:{http.port}/v1/completions"
  finally:
    http.stop()
    frontend.close()
    engine.close()


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
  task_dir = str(tmp_path_factory.mktemp("lm_eval_tasks"))
  _write_tasks(task_dir)
  return TaskManager(include_path=task_dir, include_defaults=False)


def _evaluate(model: str, model_args: dict, task_manager: TaskManager, batch_size: int) -> dict:
  results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[MC_TASK, GEN_TASK],
                                    task_manager=task_manager, batch_size=batch_size,
                                    log_samples=True, bootstrap_iters=0, random_seed=0,
                                    numpy_random_seed=0, torch_random_seed=0,
                                    fewshot_random_seed=0)
  assert results is not None
  return results


@pytest.fixture(scope="module")
def reference(checkpoint, task_manager) -> dict:
  """lm-eval's own transformers model on the same checkpoint: float32, CPU, one at a time."""
  return _evaluate("hf", {"pretrained": checkpoint, "dtype": "float32", "device": "cpu"},
                   task_manager, batch_size=1)


def _by_doc(results: dict, task: str) -> dict[int, dict]:
  return {s["doc_id"]: s for s in results["samples"][task]}


def summary(results: dict) -> dict:
  """The scores compared: acc, acc_norm, exact_match (for the report and a failure's message)."""
  mc, gen = results["results"][MC_TASK], results["results"][GEN_TASK]
  return {"acc": mc["acc,none"], "acc_norm": mc["acc_norm,none"],
          "exact_match": gen["exact_match,none"]}


@pytest.mark.parametrize("tokenized_requests", [True, False], ids=["token_ids", "strings"])
@pytest.mark.parametrize("batch_size", [1, 4], ids=["batch1", "batch4"])
def test_local_completions_scores_equal_hf(base_url, checkpoint, task_manager, reference,
                                           tokenized_requests, batch_size):
  served = _evaluate("local-completions",
                     {"base_url": base_url, "model": MODEL, "tokenizer": checkpoint,
                      "tokenizer_backend": "huggingface", "tokenized_requests": tokenized_requests,
                      "num_concurrent": 1, "max_retries": 1, "timeout": 120},
                     task_manager, batch_size=batch_size)
  assert set(served["results"]) == set(reference["results"]) == {MC_TASK, GEN_TASK}
  assert summary(served) == summary(reference)

  ours, theirs = _by_doc(served, MC_TASK), _by_doc(reference, MC_TASK)
  assert sorted(ours) == sorted(theirs) == list(range(MC_EXAMPLES))
  worst = 0.0
  for doc_id, sample in theirs.items():
    got = ours[doc_id]
    assert len(got["resps"]) == len(sample["resps"]) == CHOICES
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got["filtered_resps"], sample["filtered_resps"]):
      worst = max(worst, abs(ll - ll_ref))
      assert abs(ll - ll_ref) <= LL_TOLERANCE, (doc_id, ll, ll_ref)
      assert greedy == greedy_ref, (doc_id, ll, ll_ref)
    assert got["acc"] == sample["acc"] and got["acc_norm"] == sample["acc_norm"], doc_id
  print(f"max |d loglikelihood| {worst:.2e}; scores {summary(served)}")

  ours, theirs = _by_doc(served, GEN_TASK), _by_doc(reference, GEN_TASK)
  assert sorted(ours) == sorted(theirs) == list(range(GEN_EXAMPLES))
  texts = [theirs[i]["filtered_resps"][0] for i in range(GEN_EXAMPLES)]
  assert [ours[i]["filtered_resps"][0] for i in range(GEN_EXAMPLES)] == texts
  assert [ours[i]["resps"][0][0] for i in range(GEN_EXAMPLES)] == \
      [theirs[i]["resps"][0][0] for i in range(GEN_EXAMPLES)]
  assert any(texts) and len(set(texts)) > 1  # real, distinct generations, not empty strings
  # The stop strings ended some of them (fewer tokens than max_gen_toks): stop handling is
  # compared too, not only 24 greedy tokens.
  tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
  assert any(len(tokenizer(t)["input_ids"]) <= MAX_GEN_TOKENS // 2 for t in texts), texts
  print(f"generations: {texts}")
