"""An offline demo zoo: a tiny base model pre-trained on a shipped corpus, plus partial fine-tunes.

Everything is made here, nothing downloaded: a byte-level BPE tokenizer trained on
`demo_corpus.txt`, a small Llama-family base pre-trained briefly on the whole corpus (so its
greedy text reads like it), and N variants whose top 25% of layers are fine-tuned on distinct
sections of the corpus. Base and variants go into the zoo as "base", "variant-1", ...; the
variants share the base's embed, lower layers and head blocks by hash.
"""

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable

import numpy as np

from jblock.convert.hf import convert, export
from jblock.train import variants
from jblock.train.finetune import TrainConfig, train

CORPUS_PATH = os.path.join(os.path.dirname(__file__), "demo_corpus.txt")
EOS = "<|endoftext|>"
BASE_NAME = "base"


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """Sizes and schedule of the demo; the defaults build in well under a minute on 2 CPU cores."""
  hidden: int = 128
  layers: int = 4
  heads: int = 4
  kv_heads: int = 2
  vocab_size: int = 512  # BPE target size (the model's vocab is the tokenizer's actual size)
  pretrain_steps: int = 200
  pretrain_lr: float = 5e-3  # with 10 warm-up steps and cosine decay
  finetune_steps: int = 40
  finetune_lr: float = 3e-3
  batch_size: int = 16
  seq_len: int = 64
  seed: int = 0


def variant_names(num_variants: int) -> list[str]:
  return [f"variant-{i}" for i in range(1, num_variants + 1)]


def corpus_text() -> str:
  with open(CORPUS_PATH, encoding="utf-8") as f:
    return f.read()


def corpus_sections(text: str) -> list[str]:
  """The corpus's titled sections ("Title\\n\\nparagraph"), each ending in a newline."""
  blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
  return [f"{title}\n\n{body}\n" for title, body in zip(blocks[0::2], blocks[1::2])]


def train_tokenizer(text: str, vocab_size: int = 512):
  """A byte-level BPE tokenizer (lossless round trip for any text) trained on `text`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
  return tokenizer


def save_tokenizer(tokenizer, out_dir: str) -> None:
  """Writes tokenizer.json + tokenizer_config.json, loadable by transformers.AutoTokenizer."""
  from transformers import PreTrainedTokenizerFast
  os.makedirs(out_dir, exist_ok=True)
  PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                          model_max_length=2048).save_pretrained(out_dir)


def _tokens(tokenizer, texts: list[str]) -> np.ndarray:
  # Sections joined by EOS, as a document separator the model learns to emit at the end.
  eos = tokenizer.token_to_id(EOS)
  ids: list[int] = []
  for text in texts:
    ids += tokenizer.encode(text).ids + [eos]
  return np.asarray(ids, np.int32)


def make_base(base_dir: str, spec: DemoSpec, progress: Callable[[str], None]):
  """Tokenizer + random Llama base + brief pre-training on the whole corpus; returns the tokenizer."""
  sections = corpus_sections(corpus_text())
  tokenizer = train_tokenizer(corpus_text(), spec.vocab_size)
  save_tokenizer(tokenizer, base_dir)
  eos = tokenizer.token_to_id(EOS)
  base_spec = variants.BaseSpec(family="llama", hidden=spec.hidden, layers=spec.layers,
                                heads=spec.heads, kv_heads=spec.kv_heads,
                                vocab=tokenizer.get_vocab_size(), max_positions=2048)
  variants.init_base(base_spec, base_dir, seed=spec.seed, eos_token_id=eos, bos_token_id=eos)
  model = convert(base_dir, "float32", layers_per_block=1)
  progress(f"pre-training base ({spec.layers} layers, hidden {spec.hidden}, vocab "
           f"{base_spec.vocab}) for {spec.pretrain_steps} steps")
  cfg = TrainConfig(steps=spec.pretrain_steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                    lr=spec.pretrain_lr, seed=spec.seed, warmup=min(10, spec.pretrain_steps // 4),
                    cosine=True)
  result = train(model.blocks, _tokens(tokenizer, sections), cfg, full=True, progress=progress)
  progress(f"base: loss {result.loss_start:.3f} -> {result.loss_end:.3f}")
  export(model.config, model.hf_config, result.blocks, base_dir)
  lineage = {"kind": "pretrained", "data": "jblock/train/demo_corpus.txt (all sections)",
             "steps": spec.pretrain_steps, "seed": spec.seed, "lr": spec.pretrain_lr,
             "loss_start": round(result.loss_start, 6), "loss_end": round(result.loss_end, 6)}
  with open(os.path.join(base_dir, variants.LINEAGE_FILE), "w") as f:
    json.dump(lineage, f, indent=2, sort_keys=True)
  return tokenizer


def make_demo_checkpoints(work_dir: str, num_variants: int, spec: DemoSpec = DemoSpec(),
                          progress: Callable[[str], None] = print) -> dict[str, str]:
  """HF checkpoints of the demo models under work_dir: {zoo name: checkpoint dir}."""
  base_dir = os.path.join(work_dir, BASE_NAME)
  tokenizer = make_base(base_dir, spec, progress)
  sections = corpus_sections(corpus_text())
  # Distinct data per variant: whole sections when there are enough, else token slices.
  if num_variants <= len(sections):
    parts = [list(p) for p in np.array_split(np.array(sections, object), num_variants)]
    data = [_tokens(tokenizer, part) for part in parts]
    names = ["demo corpus sections: " + ", ".join(s.split("\n", 1)[0] for s in part)
             for part in parts]
  else:
    data, names = _tokens(tokenizer, sections), None
  dirs = variants.make_variants(
      base_dir, os.path.join(work_dir, "variants"), num_variants,
      trainable_top_layers=max(1, spec.layers // 4), steps=spec.finetune_steps, seed=spec.seed,
      data=data, lr=spec.finetune_lr, batch_size=spec.batch_size, seq_len=spec.seq_len,
      data_descriptions=names, progress=progress)
  return {BASE_NAME: base_dir, **dict(zip(variant_names(num_variants), dirs))}


def demo_exists(zoo_dir: str, num_variants: int = 3) -> bool:
  """Whether the zoo already holds the demo models (base and variant-1..N)."""
  if not os.path.isdir(zoo_dir):
    return False
  from jblock.zoo.store import Zoo
  have = set(Zoo(zoo_dir).models())
  return {BASE_NAME, *variant_names(num_variants)} <= have


def build_demo_zoo(zoo_dir: str, num_variants: int = 3, progress: Callable[[str], None] = print,
                   spec: DemoSpec = DemoSpec(), work_dir: str | None = None) -> list[str]:
  """Builds the demo models into the zoo; returns the names added ([] if already there).

  Idempotent: a zoo that already holds them is left untouched. `work_dir` keeps the HF
  checkpoints (default: a temporary directory, removed afterwards).
  """
  if demo_exists(zoo_dir, num_variants):
    progress(f"demo zoo already present in {zoo_dir}")
    return []
  from jblock.zoo.store import Zoo
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="jblock-demo-") as tmp:
    sources = make_demo_checkpoints(work_dir or tmp, num_variants, spec, progress)
    zoo = Zoo(zoo_dir)
    have = set(zoo.models())
    added = []
    for name, hf_dir in sources.items():
      if name in have:
        continue
      report = zoo.convert(hf_dir, name, dtype="float32", layers_per_block=1,
                           lineage=_lineage(hf_dir, name))
      progress(f"zoo: {name}: blocks {len(report.written)} written, {len(report.reused)} shared")
      added.append(name)
  progress(f"demo zoo built in {time.time() - start:.1f}s: {', '.join(added)} -> {zoo_dir}")
  return added


def _lineage(hf_dir: str, name: str) -> dict | None:
  path = os.path.join(hf_dir, variants.LINEAGE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    lineage = json.load(f)
  if name != BASE_NAME:
    lineage["base_model"] = BASE_NAME  # the zoo name, not the (temporary) source dir
  return lineage
