"""Manifests that cannot lie: a hand-edited, truncated or escaping manifest is caught by verify,
refused by name at load and at server start-up while the other models serve, and gc keeps the
blocks of a model's last verified manifest unless forced."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import jblock
from jblock.models.config import ModelConfig
from jblock.models.reference import Model
from jblock.serving.engines import zoo_models
from jblock.zoo import cli, integrity, verified
from jblock.zoo.integrity import HASH_FIELD, ManifestIntegrityError
from jblock.zoo.loading import spec_from_zoo
from jblock.zoo.manifest import CorruptedManifestError
from tests.hf_models import BASE
from tests.zoo.conftest import NUM_LAYERS, PROMPTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_TOKENS = 6
PROMPT = PROMPTS[:1]
VOCAB = BASE["vocab_size"]


def _tokens(model) -> list[int]:
  return model.generate(PROMPT, NEW_TOKENS)[0].tolist()


@pytest.fixture(scope="module")
def baseline(zoo_reports):
  """Greedy tokens of every model of the untouched zoo."""
  zoo, _ = zoo_reports
  return {name: _tokens(zoo.load_model(name)) for name in zoo.models()}


def _edit(zoo, name, change):
  """Edits a manifest by hand, as an operator or attacker would: no re-seal."""
  path = os.path.join(zoo.models_dir, f"{name}.json")
  with open(path) as f:
    data = json.load(f)
  change(data)
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
  return data


def _swap_layers(m):
  m["chain"][2], m["chain"][3] = m["chain"][3], m["chain"][2]


def _drop_two_layers(m):
  del m["chain"][2:4], m["block_bytes"][2:4]


def _huge_vocab(m):
  m["config"]["vocab_size"] = 1_000_000


def _escaping_tokenizer(m):
  m["tokenizer"] = "../../../../../etc"


TAMPERING = {
    "swap": (_swap_layers, [f"{HASH_FIELD} mismatch"]),
    "drop": (_drop_two_layers, [f"{HASH_FIELD} mismatch",
                                f"the layers blocks cover 1 layers; the model config's "
                                f"num_layers is {NUM_LAYERS}"]),
    "vocab": (_huge_vocab, [f"{HASH_FIELD} mismatch"] + [
        f"chain[{p}] {kind} block disagrees with the model config in vocab_size (block {VOCAB}, "
        "config 1000000)" for p, kind in ((0, "embed"), (NUM_LAYERS + 1, "head"))]),
    "tokenizer": (_escaping_tokenizer, [f"{HASH_FIELD} mismatch",
                                        "tokenizer path '../../../../../etc' climbs out with '..'"]),
}


def test_fresh_manifests_are_sealed_and_recorded(zoo_reports):
  zoo, reports = zoo_reports
  for name, report in zip(("base", "ft-1", "ft-2"), reports):
    m = zoo.manifest(name)
    assert m[HASH_FIELD] == integrity.digest(m) and len(m[HASH_FIELD]) == 64
    assert verified.read_all(zoo.root)[name] == set(report.chain)
  assert "seal: manifest_sha256 " in "\n".join(cli.show_lines(zoo, "ft-1"))


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_is_caught_by_verify_and_refused_at_load(case, zoo_copy, baseline, caplog):
  zoo = zoo_copy
  change, expected = TAMPERING[case]
  tampered = _edit(zoo, "ft-1", change)

  problems = zoo.verify()
  where = "model 'ft-1' (models/ft-1.json): "
  assert len(problems) == len(expected)
  assert all(p.startswith(where + e) for p, e in zip(problems, expected)), problems
  assert not any(zoo.root in p for p in problems)  # no absolute zoo path in what users read

  with pytest.raises(ManifestIntegrityError, match="model 'ft-1' .* refused: ") as refused:
    zoo.load_model("ft-1")
  assert [p[:len(e)] for p, e in zip(refused.value.problems, expected)] == expected
  with pytest.raises(ManifestIntegrityError, match="model 'ft-1'"):
    spec_from_zoo(zoo, "ft-1", {}, load_params=False)

  with caplog.at_level(logging.ERROR):
    assert zoo_models(zoo.root, None) == ["base", "ft-2"]
  lines = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
  assert lines == [f"jblock: refusing model 'ft-1': models/ft-1.json: "
                   f"{'; '.join(refused.value.problems)}"]
  assert _tokens(jblock.from_zoo(zoo.root, "ft-2")) == baseline["ft-2"]
  assert spec_from_zoo(zoo, "base", {}, load_params=False).block_ids == zoo.manifest("base")["chain"]

  if case == "swap":  # what loading the edited chain would have served: other tokens, no error
    config = ModelConfig.from_dict(tampered["config"])
    swapped = Model(config, [zoo.load_block(i) for i in tampered["chain"]])
    assert _tokens(swapped) != baseline["ft-1"]


def test_truncated_manifest_refuses_only_its_model(zoo_copy, baseline, caplog):
  zoo = zoo_copy
  path = os.path.join(zoo.models_dir, "ft-1.json")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])
  problems = zoo.verify()
  assert len(problems) == 1
  assert problems[0].startswith("corrupted manifest of model 'ft-1' (models/ft-1.json): ")
  assert zoo.root not in problems[0]
  with caplog.at_level(logging.ERROR):
    assert zoo_models(zoo.root, None) == ["base", "ft-2"]
  lines = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith(
      "jblock: refusing model 'ft-1': corrupted manifest of model 'ft-1' (models/ft-1.json): "
      "Expecting value")
  assert _tokens(jblock.from_zoo(zoo.root, "base")) == baseline["base"]
  assert cli.list_lines(zoo)[2].split()[:2] == ["ft-1", "UNREADABLE"]
  with pytest.raises(CorruptedManifestError, match="model 'ft-1'"):
    zoo.load_model("ft-1")


def test_every_model_refused_fails_start_up(zoo_copy):
  for name in zoo_copy.models():
    _edit(zoo_copy, name, _huge_vocab)
  with pytest.raises(ValueError, match=r"every model was refused \(base, ft-1, ft-2\)"):
    zoo_models(zoo_copy.root, None)


def test_gc_keeps_blocks_of_the_last_verified_manifest_unless_forced(zoo_copy, zoo_reports):
  zoo = zoo_copy
  _, reports = zoo_reports
  dropped = reports[1].chain[2:4]  # ft-1's own two top layers
  assert set(dropped) == set(reports[1].written)
  _edit(zoo, "ft-1", _drop_two_layers)

  kept = zoo.gc()
  assert kept.removed == [] and kept.kept == sorted(dropped) and kept.kept_for == ["ft-1"]
  assert all(zoo.has_block(b) for b in dropped)
  assert "kept 2 blocks that the last verified manifests of ft-1 reference" in "\n".join(
      cli.gc_lines(kept))

  # Re-sealing a chain that contradicts its blocks is refused: the seal is not the only check.
  with pytest.raises(ManifestIntegrityError, match="not re-sealed: the layers blocks cover 1"):
    zoo.reseal("ft-1")

  forced = zoo.gc(force=True)
  assert sorted(forced.removed) == sorted(dropped) and forced.kept == []
  assert not any(zoo.has_block(b) for b in dropped)
  assert zoo.load_model("ft-2").blocks[-2].id == reports[2].chain[-2]


def test_removed_model_and_hand_deleted_manifest(zoo_copy, zoo_reports):
  zoo = zoo_copy
  _, reports = zoo_reports
  zoo.remove_model("ft-1")  # the supported way: its record goes with it
  assert sorted(zoo.gc().removed) == sorted(reports[1].written)
  os.remove(os.path.join(zoo.models_dir, "ft-2.json"))  # by hand: its record stays
  kept = zoo.gc()
  assert kept.removed == [] and kept.kept == sorted(reports[2].written)
  assert kept.kept_for == ["ft-2"]
  assert sorted(zoo.gc(force=True).removed) == sorted(reports[2].written)
  assert verified.names(zoo.root) == ["base"]  # force drops records of models that are gone


def test_rehash_seals_an_old_manifest(zoo_copy, baseline):
  zoo = zoo_copy
  _edit(zoo, "ft-2", lambda m: m.pop(HASH_FIELD))  # as written before manifests were sealed
  os.remove(os.path.join(zoo.root, verified.VERIFIED_DIR, "ft-2.json"))
  assert zoo.verify() == ["model 'ft-2' (models/ft-2.json): no recorded manifest_sha256 (written "
                          "before manifests were sealed); if you trust it, re-seal it with: "
                          "python -m tools.zoo rehash ft-2"]
  assert "ft-2" not in verified.names(zoo.root)
  lines = cli.rehash_lines(zoo, ["ft-2"])
  assert lines[0].startswith("re-sealed model 'ft-2' (models/ft-2.json): manifest_sha256 ")
  assert lines[0].endswith("(none recorded)")
  assert zoo.verify() == [] and "ft-2" in verified.names(zoo.root)
  assert _tokens(zoo.load_model("ft-2")) == baseline["ft-2"]


def test_tokenizer_paths_stay_inside_the_zoo(zoo_copy, tmp_path):
  root = zoo_copy.root
  for rel, reason in (("/etc", "is absolute"), ("models/../../x", "climbs out with '..'"),
                      ("", "relative to the zoo, or null")):
    with pytest.raises(ValueError, match=reason):
      integrity.tokenizer_path(root, {"tokenizer": rel})
  outside = tmp_path / "outside"
  outside.mkdir()
  os.symlink(outside, os.path.join(zoo_copy.models_dir, "link.tokenizer"))
  with pytest.raises(ValueError, match="'models/link.tokenizer' resolves outside the zoo"):
    integrity.tokenizer_path(root, {"tokenizer": "models/link.tokenizer"})
  assert integrity.tokenizer_path(root, {"tokenizer": "models/ft-1.tokenizer"}) == os.path.join(
      root, "models/ft-1.tokenizer")


def test_verify_cli_names_the_tampered_model(zoo_copy):
  _edit(zoo_copy, "ft-2", _huge_vocab)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-m", "tools.zoo", "verify", f"--zoo={zoo_copy.root}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  lines = result.stdout.splitlines()
  assert lines[-1] == "verified 9 blocks and 3 models: 3 problems"
  assert lines[0] == f"problem: model 'ft-2' (models/ft-2.json): {HASH_FIELD} mismatch: the " \
                     "manifest was changed after it was written"
  assert zoo_copy.root not in result.stdout
