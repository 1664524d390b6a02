"""The zoo stores each distinct block once, loads models bit-exactly and catches corruption."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jblock
from jblock.blocks import HEAD, Block, flat_leaves
from jblock.convert import hf
from jblock.errors import CorruptedBlockError, InvalidRequestError, NotFoundError
from jblock.zoo import ModelExistsError, Zoo
from tests import hf_models
from tests.zoo.conftest import NUM_LAYERS, NUM_VARIANTS, PROMPTS, TRAINED_TOP, make_variant


def _distinct_blocks(*hf_dirs, **options):
  blocks = {}
  for d in hf_dirs:
    blocks.update((b.id, b) for b in hf.convert(d, **options).blocks)
  return blocks


def test_partial_finetunes_share_frozen_blocks(zoo_reports, base_dir, variant_dirs):
  zoo, (base, *variants) = zoo_reports
  expected = NUM_LAYERS + 2 + NUM_VARIANTS * TRAINED_TOP
  assert len(zoo.block_ids()) == expected == 9
  assert len(base.written) == NUM_LAYERS + 2 and base.reused == []
  for report in variants:
    assert len(report.written) == TRAINED_TOP and len(report.reused) == NUM_LAYERS + 2 - TRAINED_TOP
    # Only the top layers differ from the base's chain.
    assert report.chain[:1 + NUM_LAYERS - TRAINED_TOP] == base.chain[:1 + NUM_LAYERS - TRAINED_TOP]
    assert report.chain[-1] == base.chain[-1]
    assert report.bytes_written == sum(zoo.block_record(i)["nbytes"] for i in report.written)

  distinct = _distinct_blocks(base_dir, *variant_dirs)
  assert sorted(distinct) == zoo.block_ids()
  stats = zoo.stats()
  assert stats.stored_bytes == sum(b.nbytes for b in distinct.values())
  assert stats.logical_bytes == sum(r.model_bytes for r in zoo_reports[1]) == 3 * base.model_bytes
  assert stats.dedup_ratio == pytest.approx(stats.logical_bytes / stats.stored_bytes)
  layer_bytes = zoo.block_record(base.chain[1])["nbytes"]
  assert stats.stored_bytes == base.model_bytes + NUM_VARIANTS * TRAINED_TOP * layer_bytes
  assert (stats.models, stats.stored_blocks, stats.referenced_blocks) == (3, 9, 9)
  assert (stats.orphan_blocks, stats.missing_blocks) == (0, 0)
  assert zoo.verify() == []


def test_from_zoo_logits_equal_from_hf_exactly(zoo_reports, base_dir, variant_dirs):
  zoo, _ = zoo_reports
  for name, hf_dir in (("base", base_dir), ("ft-2", variant_dirs[1])):
    ours = jblock.from_zoo(zoo.root, name)
    ref = jblock.from_hf(hf_dir)
    assert ours.name == name and ours.config == ref.config
    for a, b in zip(ours.blocks, ref.blocks):
      assert a.id == b.id
      for (pa, la), (pb, lb) in zip(flat_leaves(a.params), flat_leaves(b.params)):
        assert pa == pb and isinstance(la, np.ndarray) and la.dtype == lb.dtype
        assert np.array_equal(la, lb)
    assert np.array_equal(ours.logits(PROMPTS), ref.logits(PROMPTS))
  # Variants really differ from the base (the zoo did not hand back the base's blocks).
  assert not np.array_equal(jblock.from_zoo(zoo.root, "ft-1").logits(PROMPTS[:1]),
                            jblock.from_zoo(zoo.root, "base").logits(PROMPTS[:1]))


def test_reconversion_writes_nothing(zoo_reports, variant_dirs):
  zoo, reports = zoo_reports
  before = zoo.manifest("ft-1")
  blocks_before = {i: os.stat(os.path.join(zoo.blocks_dir, i)).st_mtime_ns for i in zoo.block_ids()}
  again = zoo.convert(variant_dirs[0], "ft-1", lineage={"base_model": "base"})
  assert again.written == [] and again.bytes_written == 0 and not again.manifest_written
  assert again.reused == reports[1].chain and again.chain == reports[1].chain
  assert zoo.manifest("ft-1") == before
  assert {i: os.stat(os.path.join(zoo.blocks_dir, i)).st_mtime_ns
          for i in zoo.block_ids()} == blocks_before
  assert os.listdir(zoo.tmp_dir) == []


def test_manifest_records_config_chain_tokenizer_and_lineage(zoo_reports, base_dir, variant_dirs):
  zoo, reports = zoo_reports
  assert zoo.models() == ["base", "ft-1", "ft-2"]
  m = zoo.manifest("ft-1")
  assert m["name"] == "ft-1" and m["family"] == "llama" and m["chain"] == reports[1].chain
  assert m["config"] == jblock.from_hf(base_dir).config.to_dict()
  assert m["hf_config"] == hf.read_hf_config(variant_dirs[0])
  assert m["lineage"]["base_model"] == "base"
  assert m["lineage"]["source_dir"] == os.path.abspath(variant_dirs[0])
  assert m["lineage"]["conversion"] == {"dtype": "float32", "layers_per_block": 1}
  assert m["created"].endswith("+00:00")
  assert zoo.manifest("base")["lineage"]["base_model"] is None
  tok = os.path.join(zoo.root, "models", "ft-1.tokenizer")
  assert zoo.tokenizer_dir("ft-1") is None  # files copied, but no tokenizer.json to serve text with
  assert sorted(os.listdir(tok)) == ["generation_config.json", "tokenizer_config.json"]
  with open(os.path.join(tok, "tokenizer_config.json")) as f:
    assert json.load(f) == {"model_max_length": 128}
  record = zoo.block_record(m["chain"][-1])
  head = hf.convert(variant_dirs[0]).blocks[-1]
  assert record["kind"] == HEAD and record["nbytes"] == m["block_bytes"][-1] == head.nbytes
  assert record["leaves"] == {path: {"dtype": "float32", "shape": list(a.shape)}
                              for path, a in flat_leaves(head.params)}


def test_missing_names_and_blocks(zoo_reports):
  zoo, _ = zoo_reports
  with pytest.raises(NotFoundError, match="no model 'nope'.*known: base, ft-1, ft-2"):
    zoo.load_model("nope")
  with pytest.raises(NotFoundError, match="no block 0000"):
    zoo.load_block("0" * 64)
  with pytest.raises(NotFoundError, match="not a block id"):
    zoo.load_block("../models")
  assert not zoo.has_block("0" * 64)
  with pytest.raises(InvalidRequestError, match="name"):
    zoo.manifest("../escape")


def test_existing_name_with_another_chain_needs_overwrite(zoo_copy, base_dir, variant_dirs):
  zoo = zoo_copy
  with pytest.raises(ModelExistsError, match="'base' already exists with a different chain"):
    zoo.convert(variant_dirs[0], "base")
  assert zoo.manifest("base")["chain"] == _chain(base_dir)
  report = zoo.convert(variant_dirs[0], "base", overwrite=True)
  assert report.manifest_written and report.written == []
  assert zoo.manifest("base")["chain"] == _chain(variant_dirs[0])
  # The old base's trained-over top layers are now referenced by no model: gc's to remove.
  assert zoo.stats().orphan_blocks == TRAINED_TOP
  assert zoo.verify() == []


def _chain(hf_dir, **options):
  return [b.id for b in hf.convert(hf_dir, **options).blocks]


def _largest_data_file(block_dir):
  files = [os.path.join(p, f) for p, _, fs in os.walk(block_dir) for f in fs
           if f != "block.json"]
  return max(files, key=os.path.getsize)


def test_flipped_byte_is_caught_by_load_and_verify(zoo_copy, zoo_reports):
  zoo = zoo_copy
  _, reports = zoo_reports
  target = reports[1].written[0]  # a layers block of ft-1 only
  path = _largest_data_file(os.path.join(zoo.blocks_dir, target))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  with open(path, "wb") as f:
    f.write(data)
  with pytest.raises(CorruptedBlockError, match=f"corrupted block {target}"):
    zoo.load_block(target)
  with pytest.raises(CorruptedBlockError, match=target):
    zoo.load_model("ft-1")
  problems = zoo.verify()
  assert len(problems) == 1 and f"corrupted block {target}" in problems[0]
  zoo.load_model("ft-2")  # other models are unaffected


def test_tampered_block_record_is_caught(zoo_copy, zoo_reports):
  zoo = zoo_copy
  target = zoo_reports[1][0].chain[1]
  path = os.path.join(zoo.blocks_dir, target, "block.json")
  with open(path) as f:
    record = json.load(f)
  record["config"]["norm_eps"] *= 2  # a config change alters the math: the hash must catch it
  with open(path, "w") as f:
    json.dump(record, f)
  with pytest.raises(CorruptedBlockError, match=f"corrupted block {target}: .*hash to"):
    zoo.load_block(target)
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(CorruptedBlockError, match="unreadable block.json"):
    zoo.load_block(target)
  assert any(target in p for p in zoo.verify())


def test_verify_reports_missing_blocks(zoo_copy, zoo_reports):
  zoo = zoo_copy
  head = zoo_reports[1][0].chain[-1]
  os.rename(os.path.join(zoo.blocks_dir, head), os.path.join(zoo.root, "elsewhere"))
  problems = zoo.verify()
  assert len(problems) == 3  # every model shares the head
  assert all(f"chain[4] block {head} is missing" in p for p in problems)
  assert zoo.stats().missing_blocks == 1


def test_gc_removes_orphans_only(zoo_copy, zoo_reports):
  zoo = zoo_copy
  _, reports = zoo_reports
  zoo.remove_model("ft-1")
  assert zoo.models() == ["base", "ft-2"] and not os.path.exists(
      os.path.join(zoo.models_dir, "ft-1.tokenizer"))
  orphans = sorted(reports[1].written)
  assert zoo.stats().orphan_blocks == len(orphans) == TRAINED_TOP
  os.makedirs(os.path.join(zoo.tmp_dir, "123-crashed-write"))
  result = zoo.gc()
  assert sorted(result.removed) == orphans and result.freed_bytes > 0 and result.stale_tmp == 1
  referenced = set(reports[0].chain) | set(reports[2].chain)
  assert set(zoo.block_ids()) == referenced
  assert zoo.gc().removed == []  # nothing left to remove; referenced blocks never go
  assert zoo.verify() == []
  assert zoo.load_model("ft-2").blocks[-2].id == reports[2].chain[-2]
  with pytest.raises(NotFoundError):
    zoo.remove_model("ft-1")


def test_losing_a_write_race_keeps_the_winner(zoo_copy, base_dir):
  zoo = zoo_copy
  block = hf.convert(base_dir).blocks[1]
  record_before = zoo.block_record(block.id)
  # As if another process stored this id between our has_block check and our rename.
  assert zoo.write_block(block, block.id) is False
  assert zoo.block_record(block.id) == record_before
  assert os.listdir(zoo.tmp_dir) == []
  assert zoo.load_block(block.id).id == block.id


def test_layers_per_block_two(tmp_path, base_dir):
  zoo = Zoo(str(tmp_path / "zoo"))
  report = zoo.convert(base_dir, "base-k2", layers_per_block=2)
  assert len(report.chain) == 1 + 2 + 1  # ceil(3 / 2) layers blocks
  layers = [zoo.block_record(i)["config"].get("num_layers") for i in report.chain]
  assert layers == [None, 2, 1, None]
  assert zoo.manifest("base-k2")["lineage"]["conversion"]["layers_per_block"] == 2
  ref = jblock.from_hf(base_dir, layers_per_block=2)
  assert np.array_equal(zoo.load_model("base-k2").logits(PROMPTS), ref.logits(PROMPTS))


@pytest.mark.parametrize("family", ["llama_tied_mha", "gpt2"])
def test_tied_embeddings_stay_exact(tmp_path, family):
  hf_dir, _ = hf_models.build(family, str(tmp_path / family))
  zoo = Zoo(str(tmp_path / "zoo"))
  report = zoo.convert(hf_dir, family)
  head = zoo.load_block(report.chain[-1])
  assert head.config["tied_to"] == report.chain[0]
  assert "embedding" not in head.params  # the table is stored once, in the embed block
  assert np.array_equal(zoo.load_model(family).logits(PROMPTS),
                        jblock.from_hf(hf_dir).logits(PROMPTS))
  if family == "llama_tied_mha":
    # A fine-tune of the top layer shares the embed block and therefore the tied head.
    variant = make_variant(hf_dir, str(tmp_path / "ft"), [NUM_LAYERS - 1], seed=7)
    ft = zoo.convert(variant, "ft")
    assert ft.chain[0] == report.chain[0] and ft.chain[-1] == report.chain[-1]
    assert len(ft.written) == 1 and len(zoo.block_ids()) == NUM_LAYERS + 3
    assert np.array_equal(zoo.load_model("ft").logits(PROMPTS),
                          jblock.from_hf(variant).logits(PROMPTS))
  assert zoo.verify() == []


def test_bfloat16_round_trip(tmp_path, base_dir):
  zoo = Zoo(str(tmp_path / "zoo"))
  report = zoo.convert(base_dir, "base-bf16", dtype="bfloat16")
  expected = hf.convert(base_dir, dtype="bfloat16").blocks
  assert report.chain == [b.id for b in expected]
  assert report.model_bytes == sum(b.nbytes for b in hf.convert(base_dir).blocks) // 2
  for block_id, ref in zip(report.chain, expected):
    loaded = zoo.load_block(block_id)
    for (_, a), (_, b) in zip(flat_leaves(loaded.params), flat_leaves(ref.params)):
      assert a.dtype == ml_dtypes.bfloat16
      assert a.tobytes() == b.tobytes()
  ours = zoo.load_model("base-bf16").logits(PROMPTS)
  assert np.array_equal(ours, jblock.from_hf(base_dir, dtype="bfloat16").logits(PROMPTS))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host device count)")
def test_load_block_onto_devices(zoo_reports):
  zoo, reports = zoo_reports
  devices = np.array(jax.devices()[:2])
  mesh = jax.sharding.Mesh(devices, ("model",))
  block_id = reports[0].chain[1]
  host = zoo.load_block(block_id)

  def sharding(path):
    # Column-split the 2-D kernels whose last dim divides evenly; replicate the rest.
    leaf = dict(flat_leaves(host.params))[path]
    split = leaf.ndim == 2 and leaf.shape[-1] % len(devices) == 0
    return NamedSharding(mesh, PartitionSpec(None, "model") if split else PartitionSpec())

  placed = zoo.load_block(block_id, sharding=sharding)
  assert placed.id == block_id
  split_any = False
  for (path, a), (_, b) in zip(flat_leaves(placed.params), flat_leaves(host.params)):
    assert isinstance(a, jax.Array) and a.sharding == sharding(path)
    split_any |= a.sharding.spec == PartitionSpec(None, "model")
    assert np.array_equal(np.asarray(a), b)
  assert split_any
  # One sharding for every leaf, and a tree that does not fit.
  replicated = zoo.load_block(block_id, sharding=NamedSharding(mesh, PartitionSpec()))
  assert all(a.sharding.is_fully_replicated for _, a in flat_leaves(replicated.params))
  with pytest.raises(ValueError, match="no entry for param"):
    zoo.load_block(block_id, sharding={"layer_0": {}})


def test_invalid_model_name_is_rejected(tmp_path, base_dir):
  with pytest.raises(InvalidRequestError, match="not a valid model name"):
    Zoo(str(tmp_path / "zoo")).convert(base_dir, "a/b")


def test_block_without_params_round_trips(tmp_path):
  # orbax cannot save an empty tree; such a block is its block.json alone.
  block = Block(HEAD, {"family": "test", "tied_to": None}, {})
  zoo = Zoo(str(tmp_path / "zoo"))
  assert zoo.write_block(block, block.id)
  loaded = zoo.load_block(block.id)
  assert (loaded.kind, loaded.config, loaded.params) == (block.kind, block.config, {})
  assert loaded.id == block.id
  assert zoo.verify() == []
