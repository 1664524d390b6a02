"""Equivalence evaluation and adaptive assembly (jblock.zoo.equivalence, jblock.zoo.assemble)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jblock.blocks import EMBED, HEAD, LAYERS
from jblock.errors import InvalidRequestError
from jblock.train import variants
from jblock.zoo import Zoo, records
from jblock.zoo import assemble as asm
from jblock.zoo import cli
from jblock.zoo import equivalence as eqv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = variants.BaseSpec(family="llama", hidden=32, layers=4, heads=4, kv_heads=2, vocab=61,
                         max_positions=128)
# A "full fine-tune": every tensor moves, by a different amount per chain position, so some of
# its blocks are close to the base's and some are far.
FULL_SCALES = {"model.embed_tokens": 0.002, "model.layers.0.": 0.004, "model.layers.1.": 0.08,
               "model.layers.2.": 0.006, "model.layers.3.": 0.3, "lm_head": 0.02,
               "model.norm": 0.01}
TOKENS = np.random.default_rng(0).integers(0, SPEC.vocab, 1600)
OPTS = dict(seq_len=32, max_windows=12, holdout=0.25)


def _perturb(src: str, dst: str, scales: dict[str, float], seed: int) -> str:
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  rng = np.random.default_rng(seed)
  for name, tensor in tensors.items():
    scale = next((v for k, v in scales.items() if name.startswith(k)), 0.0)
    if scale:
      tensors[name] = (tensor + rng.normal(0, scale, tensor.shape)).astype(tensor.dtype)
  save_file(tensors, path, metadata={"format": "pt"})
  return dst


@pytest.fixture(scope="module")
def eq_zoo(tmp_path_factory):
  """base; ft (full fine-tune of base); part (only layer 3 changed); wide (other shapes)."""
  root = tmp_path_factory.mktemp("equiv")
  base = variants.init_base(SPEC, str(root / "base"), seed=0, init_std=0.2)
  full = _perturb(base, str(root / "ft"), FULL_SCALES, seed=1)
  part = _perturb(base, str(root / "part"), {"model.layers.3.": 0.05}, seed=2)
  wide = variants.init_base(variants.BaseSpec(family="llama", hidden=48, layers=4, heads=4,
                                              vocab=61, max_positions=128),
                            str(root / "wide"), seed=3, init_std=0.2)
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  zoo.convert(full, "ft", lineage={"base_model": "base"})
  zoo.convert(part, "part", lineage={"base_model": "base"})
  zoo.convert(wide, "wide")
  return zoo


@pytest.fixture
def eq_copy(eq_zoo, tmp_path):
  shutil.copytree(eq_zoo.root, tmp_path / "zoo")
  return Zoo(str(tmp_path / "zoo"))


@pytest.fixture(scope="module")
def ft_eq(eq_zoo):
  return eqv.Equivalence(eq_zoo, "ft", TOKENS, **OPTS)


def test_identical_blocks_are_equivalent_with_zero_loss(eq_zoo, ft_eq):
  for p in range(len(ft_eq.chain)):
    m = ft_eq.evaluate(p, ft_eq.chain[p], store=False)["metrics"]
    assert m["kl"] == 0.0 and m["top1"] == 1.0 and m["block_rel_l2"] == 0.0
    assert m["block_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["perplexity"] == m["perplexity_original"]
    assert m["tokens"] == 12 * 32
  # A partial fine-tune's frozen blocks are the base's: same id, so nothing to substitute there,
  # and the base's block at a frozen position is equivalent with zero loss.
  part = eqv.Equivalence(eq_zoo, "part", TOKENS, **OPTS)
  base_chain = eq_zoo.manifest("base")["chain"]
  assert [len(part.candidates(p)) for p in range(6)] == [0, 0, 0, 0, 1, 0]
  m = part.evaluate(2, base_chain[2], store=False)["metrics"]
  assert m["kl"] == 0.0 and m["top1"] == 1.0


def test_measured_loss_follows_how_far_each_block_moved(ft_eq):
  base_chain = ft_eq.zoo.manifest("base")["chain"]
  got = {p: ft_eq.evaluate(p, base_chain[p], store=False)["metrics"] for p in range(6)}
  # Layers 0 and 2 moved little, layer 1 more, layer 3 a lot (chain positions 1..4).
  assert got[1]["block_rel_l2"] < got[2]["block_rel_l2"] < got[4]["block_rel_l2"]
  assert got[3]["block_rel_l2"] < got[2]["block_rel_l2"]
  assert got[1]["kl"] < got[2]["kl"] < got[4]["kl"]
  assert got[4]["top1"] < 0.5 < got[1]["top1"]
  for m in got.values():
    assert 0 < m["kl"] and 0 < m["block_rel_l2"] and m["block_cosine"] <= 1.0
    assert 0.0 <= m["top1"] < 1.0
  # Combined with an accepted substitution, the loss is measured against the original model.
  both = ft_eq.evaluate(3, base_chain[3], context={1: base_chain[1]}, store=False)["metrics"]
  assert both["kl"] > got[3]["kl"]
  assert both == ft_eq.measure({1: base_chain[1], 3: base_chain[3]}) | {
      "block_rel_l2": both["block_rel_l2"], "block_cosine": both["block_cosine"]}


def test_other_kind_or_shape_is_never_a_candidate(eq_zoo, ft_eq):
  wide = eq_zoo.manifest("wide")["chain"]
  base = eq_zoo.manifest("base")["chain"]
  for p in range(6):
    assert ft_eq.candidates(p, sources=["wide"]) == []
    assert ft_eq.candidates(p, sources=["wide"], any_position=True) == []
    with pytest.raises(eqv.NotACandidateError, match="hidden_size"):
      ft_eq.check_candidate(p, wide[p])
  with pytest.raises(eqv.NotACandidateError, match="kind embed is not layers"):
    ft_eq.check_candidate(1, base[0])
  with pytest.raises(eqv.NotACandidateError, match="kind layers is not head"):
    ft_eq.evaluate(5, base[4])
  # From any position of the base: its four layers blocks, never its embed or head.
  found = ft_eq.candidates(2, sources=["base"], any_position=True)
  assert sorted(c.block_id for c in found) == sorted(base[1:5])
  assert [c.block_id for c in ft_eq.candidates(0)] == [base[0]]  # default source: base_model
  assert ft_eq.candidates(5)[0].models == ("base",)
  record = eq_zoo.block_record(base[1])
  shrunk = dict(record, leaves={**record["leaves"], "layer_0/mlp/down/kernel": {
      "dtype": "float32", "shape": [1, 1]}})
  assert eqv.candidate_problem(record, shrunk) == "param shapes or dtypes differ"
  kinds = {eq_zoo.block_record(b)["kind"] for b in base}
  assert kinds == {EMBED, LAYERS, HEAD}


def test_records_survive_restart_and_gc(eq_copy):
  report = eqv.evaluate(eq_copy, "ft", calibration=TOKENS, **OPTS)
  assert [r["position"] for r in report["records"]] == list(range(6))
  ft_chain = eq_copy.manifest("ft")["chain"]
  # One record of 'part' whose candidate is a block of 'ft'.
  part = eqv.Equivalence(eq_copy, "part", TOKENS, **OPTS)
  cross = part.evaluate(4, ft_chain[4])
  part_base = part.evaluate(4, eq_copy.manifest("base")["chain"][4])

  again = Zoo(eq_copy.root)  # a restart
  stored = records.read_all(again.root, "ft")
  assert [(r["position"], r["candidate"], r["metrics"]) for r in stored] == [
      (r["position"], r["candidate"], r["metrics"]) for r in report["records"]]
  fresh = eqv.Equivalence(again, "ft", TOKENS, **OPTS)
  read = fresh.evaluate(2, report["records"][2]["candidate"])
  assert read == report["records"][2] and fresh._runners == {}  # read back, not re-measured
  other = eqv.Equivalence(again, "ft", TOKENS[:800], **OPTS)  # another calibration set
  assert other.evaluate(2, report["records"][2]["candidate"])["key"] != read["key"]
  shown = "\n".join(cli.show_lines(again, "ft"))
  assert "equivalence records: 7" in shown and report["records"][4]["candidate"][:12] in shown

  assert again.gc().records_removed == 0  # every model still there
  assert len(records.read_all(again.root)) == 7 + 2
  again.remove_model("ft")
  gc = again.gc()
  assert set(gc.removed) == set(ft_chain) - set(again.manifest("base")["chain"])
  assert gc.records_removed == 7 + 1  # ft's own, and part's record naming an ft block
  left = records.read_all(again.root)
  assert [r["key"] for r in left] == [part_base["key"]] and cross["key"] != part_base["key"]
  assert not os.path.exists(os.path.join(again.records_dir, "ft"))


def _kl_top1(original, assembled, windows):
  p = original.logits(windows).astype(np.float64)
  q = assembled.logits(windows).astype(np.float64)
  lp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
  lq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
  kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
  return kl, float(np.mean(p.argmax(-1) == q.argmax(-1)))


@pytest.mark.parametrize("budget", [dict(max_kl=0.0), dict(min_top1=0.85), dict(max_kl=0.01),
                                    dict(max_kl=0.05, min_top1=0.8)],
                         ids=["zero", "top1", "kl", "both"])
def test_assembled_models_stay_within_budget_on_holdout(eq_zoo, tmp_path, budget):
  zoo = Zoo(str(tmp_path / "zoo"))
  shutil.copytree(eq_zoo.root, zoo.root)
  original_manifest = zoo.manifest("ft")
  out = asm.assemble(zoo, "ft", "ft-lean", calibration=TOKENS, **budget, **OPTS)
  b = asm.Budget(**budget)
  assert b.ok(out["holdout"]) and b.ok(out["fit"])
  manifest = zoo.manifest("ft-lean")
  assert manifest["provenance"]["holdout"] == out["holdout"]
  assert manifest["lineage"]["assembled_from"] == "ft"
  base_chain = zoo.manifest("base")["chain"]
  subs = {s["position"]: s["candidate"] for s in out["substitutions"]}
  assert manifest["chain"] == [subs.get(p, c) for p, c in enumerate(original_manifest["chain"])]
  assert all(c == base_chain[p] for p, c in subs.items())
  assert out["bytes_saved"] == sum(original_manifest["block_bytes"][p] for p in subs)
  if budget == dict(max_kl=0.0):
    assert subs == {} and out["holdout"]["kl"] == 0.0
  else:
    assert out["bytes_saved"] > 0 and 4 not in subs  # layer 3 moved too far for any budget
  # Independently: the assembled model as the zoo serves it, against the original, on the
  # held-out windows it was measured on.
  windows = eqv.make_calibration(TOKENS, **OPTS).holdout
  assert out["holdout"]["hash"] == eqv.windows_hash(windows)
  kl, top1 = _kl_top1(zoo.load_model("ft"), zoo.load_model("ft-lean"), windows)
  assert kl == pytest.approx(out["holdout"]["kl"], rel=1e-4, abs=1e-7)
  assert top1 == pytest.approx(out["holdout"]["top1"], abs=1e-9)
  assert b.ok({"kl": kl, "top1": top1})
  assert zoo.manifest("ft") == original_manifest and zoo.verify() == []
  assert "assembled from ft within" in "\n".join(cli.show_lines(zoo, "ft-lean"))


def test_assembly_drops_substitutions_that_break_the_budget_on_holdout(eq_copy):
  # Calibrate on one text and hold out a very different one: what fits the first may not fit
  # the second, and the held-out check must undo it.
  tokens = np.concatenate([np.resize(np.arange(5), 1200), TOKENS[:400]])
  out = asm.assemble(eq_copy, "ft", "ft-lean", calibration=tokens, max_kl=0.004, **OPTS)
  assert asm.Budget(max_kl=0.004).ok(out["holdout"])
  assert out["dropped_on_holdout"], "this calibration set should need a held-out drop"
  for d in out["dropped_on_holdout"]:
    assert d["holdout_before"]["kl"] > 0.004


def test_assembly_rejects_bad_requests(eq_copy):
  with pytest.raises(InvalidRequestError, match="give max_kl, min_top1"):
    asm.assemble(eq_copy, "ft", "x", calibration=TOKENS, **OPTS)
  with pytest.raises(InvalidRequestError, match="new name"):
    asm.assemble(eq_copy, "ft", "ft", max_kl=1.0, calibration=TOKENS, **OPTS)
  with pytest.raises(InvalidRequestError, match="no holdout windows"):
    asm.assemble(eq_copy, "ft", "x", max_kl=1.0, calibration=TOKENS, seq_len=32, holdout=0.0)
  with pytest.raises(InvalidRequestError, match="token ids must be in"):
    eqv.Equivalence(eq_copy, "ft", np.arange(100) + 10, **OPTS)
  with pytest.raises(InvalidRequestError, match="no tokenizer.json"):
    eqv.Equivalence(eq_copy, "ft")  # demo text, and a 61-token vocabulary with no tokenizer
  assert eq_copy.models() == ["base", "ft", "part", "wide"]


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", "tools.zoo", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)


def test_cli_equiv_assemble_show(eq_copy, tmp_path):
  calib = tmp_path / "tokens.json"
  calib.write_text(json.dumps(TOKENS.tolist()))
  common = [f"--zoo={eq_copy.root}", "--model=ft", f"--calibration={calib}", "--seq_len=32",
            "--max_windows=12"]
  equiv = _run("equiv", *common, f"--report={tmp_path / 'equiv.json'}")
  assert equiv.returncode == 0, equiv.stderr
  report = json.loads((tmp_path / "equiv.json").read_text())
  assert len(report["records"]) == 6 and "6 candidates on 12 windows x 32 tokens" in equiv.stdout
  assembled = _run("assemble", *common, "--name=ft-cli", "--min_top1=0.85",
                   f"--report={tmp_path / 'asm.json'}")
  assert assembled.returncode == 0, assembled.stderr
  out = json.loads((tmp_path / "asm.json").read_text())
  assert out["holdout"]["top1"] >= 0.85 and out["substitutions"]
  assert "model ft-cli assembled from ft within min_top1 0.85" in assembled.stdout
  show = _run("show", "ft-cli", f"--zoo={eq_copy.root}")
  assert show.returncode == 0 and "assembled from ft within min_top1 0.85" in show.stdout
  bad = _run("assemble", *common, "--name=ft-x")
  assert bad.returncode == 2 and "needs a budget" in bad.stderr
  unfit = _run("equiv", *common, "--position=1",
               f"--block={eq_copy.manifest('base')['chain'][0][:12]}")
  assert unfit.returncode == 1 and "not a candidate" in unfit.stderr
  assert len(unfit.stderr.strip().splitlines()) == 1


def test_the_engine_serves_an_assembled_model_like_any_model(eq_copy):
  from jblock.runtime.engine import Engine, EngineConfig
  out = asm.assemble(eq_copy, "ft", "ft-lean", calibration=TOKENS, min_top1=0.85, **OPTS)
  assert out["substitutions"]
  prompt = [5, 17, 3, 8, 41, 2, 9]
  expected = {name: eq_copy.load_model(name).generate([prompt], max_new_tokens=4)[0].tolist()
              for name in ("ft", "ft-lean")}
  resident = {}
  # Fused through the blocks both models hold: one call per model per step, weights held once.
  for through_shared in (False, True):
    config = EngineConfig(batch_size=2, kv_slots=2, max_seq_len=32, prefill_chunk=16,
                          length_buckets=(16,), warmup=False, fuse_through_shared=through_shared)
    with Engine.from_zoo(eq_copy.root, ["ft", "ft-lean"], mesh_shape=(1, 1),
                         config=config) as engine:
      for name in ("ft", "ft-lean"):
        assert engine.generate(name, prompt, max_new_tokens=4) == expected[name]
      stats = engine.stats()
    resident[through_shared] = stats["resident_bytes"]
    segments = {name: len(segs) for name, segs in stats["segments"].items()}
    assert segments == {"ft": 1, "ft-lean": 1} if through_shared else segments["ft-lean"] > 1
  assert resident[True] == resident[False]
  assert eq_copy.manifest("ft")["chain"] != eq_copy.manifest("ft-lean")["chain"]


def test_prune_drops_records_of_a_reconverted_model_and_stray_files(tmp_path):
  root, tmp = str(tmp_path), str(tmp_path / "tmp")
  chain = ["a" * 64, "b" * 64, "c" * 64]
  record = {"format": records.FORMAT, "model": "m", "model_chain": records.chain_digest(chain),
            "position": 1, "block": chain[1], "candidate": "d" * 64, "context": [[2, "e" * 64]]}
  record["key"] = records.record_key(record["model_chain"], 1, record["candidate"], "h",
                                     [(2, "e" * 64)])
  records.write(root, tmp, record)
  with open(os.path.join(root, records.RECORDS_DIR, "m", "stray.txt"), "w") as f:
    f.write("x")
  stored = set(chain) | {"d" * 64, "e" * 64}
  assert records.prune(root, tmp, stored, {"m": chain}) == 1  # only the stray file
  assert [r["key"] for r in records.read_all(root)] == [record["key"]]
  assert records.prune(root, tmp, stored - {"e" * 64}, {"m": chain}) == 1  # a context block went
  records.write(root, tmp, record)
  assert records.prune(root, tmp, stored, {"m": chain[:2] + ["f" * 64]}) == 1  # re-converted
  assert records.read_all(root) == [] and not os.path.exists(os.path.join(root, "equivalence", "m"))


# ---- on-the-fly rerouting in the engine (jblock.runtime.reroute, jblock.runtime.rerouter)


def _reroute_engine(zoo, fuse=True, **reroute_cfg):
  from jblock.runtime.engine import Engine, EngineConfig
  from jblock.runtime.reroute import RerouteConfig
  config = EngineConfig(batch_size=2, kv_slots=4, max_seq_len=48, prefill_chunk=16,
                        length_buckets=(16,), warmup=False, fuse_segments=fuse,
                        reroute=RerouteConfig(**reroute_cfg))
  return Engine.from_zoo(zoo.root, ["base", "ft"], mesh_shape=(1, 1), config=config)


def _while_absent(engine, position, off_at, on_at):
  """Wraps the engine's router: ft's own instance at `position` is taken away (not resident, as
  while it is re-placed) at the step boundary where a request has `off_at` tokens, and back at
  `on_at`; returns the instance."""
  own = engine._models["ft"][1][position]
  router = engine._scheduler.router

  def wrapped(req):
    if req.model == "ft" and len(req.generated) == off_at:
      own.available = False
    if req.model == "ft" and len(req.generated) == on_at:
      own.available = True
    return router(req)

  engine._scheduler.router = wrapped
  return own


def _substituted(zoo, model, subs):
  m = zoo.load_model(model)
  blocks = list(m.blocks)
  for p, block_id in subs.items():
    blocks[p] = zoo.load_block(block_id)
  return type(m)(m.config, blocks)


PROMPT = [5, 17, 3, 8, 41, 2, 9, 30, 11, 7, 25, 19, 4, 33, 12, 6, 50, 21]


@pytest.fixture(scope="module")
def reroute_zoo(eq_zoo, tmp_path_factory):
  root = tmp_path_factory.mktemp("reroute") / "zoo"
  shutil.copytree(eq_zoo.root, root)
  zoo = Zoo(str(root))
  eqv.evaluate(zoo, "ft", calibration=TOKENS, **OPTS)  # records: base's block at every position
  return zoo


def test_rerouted_request_recomputes_kv_and_routes_back(reroute_zoo):
  zoo = reroute_zoo
  base1 = zoo.manifest("base")["chain"][1]
  # Never interchangeable (a replay), and home again even with few tokens left.
  with _reroute_engine(zoo, kv_reuse_max_rel_l2=0.0, replay_min_remaining=0.0) as engine:
    recs = [r for r in records.read_all(zoo.root, "ft") if r["position"] == 1]
    assert engine.set_equivalences("ft", recs) == 1
    _while_absent(engine, 1, off_at=3, on_at=7)
    got = engine.generate("ft", PROMPT, max_new_tokens=10, accuracy_budget=1.0)
    events = engine.reroute_events()
    stats = engine.stats()["reroute"]
    # The prompt's first page, cached on ft's own route before the moves, survives them: a
    # later request finds it in every pool of that route (and its tokens are ft's own).
    again = engine.generate("ft", PROMPT, max_new_tokens=3)
    assert engine.stats()["prefix_cache"]["hit_tokens"] == 16
  assert [(e["generated"], e["route"], e["kv"]) for e in events] == [
      (3, [(1, base1)], "recompute"), (7, [], "recompute")]
  assert stats["moves"] == 2 and stats["routed_back"] == 1 and stats["kv_recomputed"] == 2
  assert stats["kv_reused"] == 0 and stats["steps_rerouted"] == 4
  # Tokens 1-3 from ft; 4-7 from ft with base's block 1 on the whole context (its KV replayed);
  # 8-10 from ft again, its own KV replayed over all 17 + 7 tokens.
  ft, alt = zoo.load_model("ft"), _substituted(zoo, "ft", {1: base1})
  first = ft.generate([PROMPT], max_new_tokens=3)[0].tolist()
  middle = alt.generate([PROMPT + first], max_new_tokens=4)[0].tolist()
  last = ft.generate([PROMPT + first + middle], max_new_tokens=3)[0].tolist()
  assert got == first + middle + last
  assert again == first


def test_rerouted_request_reuses_kv_of_an_interchangeable_block(reroute_zoo):
  zoo = reroute_zoo
  base1 = zoo.manifest("base")["chain"][1]
  rec = next(r for r in records.read_all(zoo.root, "ft") if r["position"] == 1)
  copied = {}
  with _reroute_engine(zoo, kv_reuse_max_rel_l2=1.0) as engine:
    engine.set_equivalences("ft", [rec])
    own = _while_absent(engine, 1, off_at=3, on_at=99)
    alt_inst = engine._instances[base1]
    router = engine._scheduler.router

    def spy(req):  # the pages ft's block wrote, then the same pages in base's block after the move
      before = [list(l.pages) for l in req.leases.get(own.key, [])]
      kv_before = np.asarray(own.kv["k"]) if before else None
      out = router(req)
      if before and own.key not in req.leases and "after" not in copied:
        n = -(-req.cached // 16)
        copied["src"] = kv_before[:, before[0][:n]]
        copied["dst"] = np.asarray(alt_inst.kv["k"])[:, req.leases[base1][0].pages[:n]]
      return out

    engine._scheduler.router = spy
    got = engine.generate("ft", PROMPT, max_new_tokens=8, accuracy_budget=1.0)
    stats = engine.stats()["reroute"]
  assert stats["kv_reused"] == 1 and stats["kv_recomputed"] == 0 and stats["moves"] == 1
  np.testing.assert_array_equal(copied["dst"], copied["src"])
  assert np.abs(copied["src"]).max() > 0  # real KV was there to copy
  # Reused KV: tokens 4-8 run base's block over ft's KV of the first 20 tokens. Here that keeps
  # ft's own greedy tokens, where recomputing the KV with base's block changes the last one.
  ft = zoo.load_model("ft").generate([PROMPT], max_new_tokens=8)[0].tolist()
  alt = _substituted(zoo, "ft", {1: base1}).generate([PROMPT + ft[:3]], max_new_tokens=5)[0]
  assert got == ft and ft[:3] + alt.tolist() != ft


def test_rerouting_keeps_each_tenant_within_its_budget(reroute_zoo):
  zoo = reroute_zoo
  base = zoo.manifest("base")["chain"]
  eq = eqv.Equivalence(zoo, "ft", TOKENS, **OPTS)
  both = eq.evaluate(2, base[2], context={1: base[1]})  # a measured route through both
  loss = {r["position"]: 1 - r["metrics"]["top1"] for r in records.read_all(zoo.root, "ft")
          if not r["context"]}
  loss_both = 1 - both["metrics"]["top1"]
  small = (loss[1] + loss[2]) / 2  # room for the cheaper of the two alone, not for both
  assert min(loss[1], loss[2]) < small < min(loss_both, max(loss[1], loss[2]))
  budgets = {"zero": 0.0, "small": small, "big": 1.0}
  # The records come from the zoo with the model; only absence (not load) moves requests here.
  # Unfused: every block its own segment, one compiled step per kind (a shorter test).
  with _reroute_engine(zoo, fuse=False, overload_requests=8) as engine:
    own = [engine._models["ft"][1][p] for p in (1, 2)]
    with engine._lock:
      for inst in own:  # ft's blocks 1 and 2 are away (as while they load) until big is done
        inst.available = False
    handles = {t: engine.submit("ft", PROMPT, max_new_tokens=8, tenant=t, accuracy_budget=b)
               for t, b in budgets.items()}
    got = {"big": handles["big"].result(timeout=120)}
    assert not handles["zero"].done  # it waits for its own blocks
    with engine._lock:
      for inst in own:
        inst.available = True
      engine._lock.notify_all()
    got.update({t: h.result(timeout=120) for t, h in handles.items()})
    events = engine.reroute_events()
    stats = engine.stats()["reroute"]
    with pytest.raises(InvalidRequestError, match="accuracy_budget"):
      engine.submit("ft", PROMPT, accuracy_budget=1.5)
  for e in events:
    assert e["cost"] <= budgets[e["tenant"]] and e["budget"] == budgets[e["tenant"]]
  first = {e["tenant"]: e for e in reversed(events)}  # each tenant's first route
  assert "zero" not in first
  assert first["big"]["route"] == [(1, base[1]), (2, base[2])]
  assert first["big"]["cost"] == pytest.approx(loss_both)
  cheaper = min((1, 2), key=loss.get)
  assert first["small"]["route"] == [(cheaper, base[cheaper])]
  assert first["small"]["cost"] == pytest.approx(loss[cheaper])
  assert stats["moves"] == sum(len(e["moves"]) for e in events)
  ft = zoo.load_model("ft")
  assert got["zero"] == ft.generate([PROMPT], max_new_tokens=8)[0].tolist()
  # big ran its whole request with base's blocks 1 and 2 (admitted there: no KV to coordinate).
  assert got["big"] == _substituted(zoo, "ft", {1: base[1], 2: base[2]}).generate(
      [PROMPT], max_new_tokens=8)[0].tolist()


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
  """base; `tiny`, a LoRA adapter whose delta is negligible; `real`, one that changes the model."""
  from tests.lora_adapters import make_adapter
  root = tmp_path_factory.mktemp("adapter_equiv")
  base = variants.init_base(SPEC, str(root / "base"), seed=0, init_std=0.2)
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
  for name, std in (("tiny", 1e-3), ("real", 0.3)):
    make_adapter(base, str(root / name), targets=targets, r=4, alpha=8, std=std, seed=5)
    zoo.convert_peft(str(root / name), "base", name)
  return zoo


def test_adapter_with_negligible_delta_is_served_by_its_base_blocks(adapter_zoo):
  from jblock.runtime.engine import Engine, EngineConfig
  zoo = adapter_zoo
  base_chain = zoo.manifest("base")["chain"]
  deltas = {n: zoo.manifest(n)["deltas"] for n in ("tiny", "real")}
  with_delta = [p for p, d in enumerate(deltas["tiny"]) if d]
  assert with_delta == [1, 2, 3, 4]  # the four layers blocks
  # The candidate at a delta position is the base block itself: the record drops the delta.
  report = eqv.evaluate(zoo, "tiny", calibration=TOKENS, **OPTS)
  recs = {r["position"]: r for r in report["records"]}
  assert sorted(recs) == with_delta
  for p, r in recs.items():
    assert (r["candidate"], r["delta"]) == (base_chain[p], deltas["tiny"][p])
    assert r["nbytes"] == zoo.manifest("tiny")["delta_bytes"][p]
    assert r["metrics"]["kl"] < 1e-6 and r["metrics"]["top1"] == 1.0
    assert r["metrics"]["block_rel_l2"] < 1e-3
  real = {r["position"]: r for r in eqv.evaluate(zoo, "real", calibration=TOKENS,
                                                 **OPTS)["records"]}
  # The reference applies the real adapter's delta: dropping it moves the outputs.
  assert all(r["metrics"]["block_rel_l2"] > 0.05 for r in real.values())
  assert all(r["metrics"]["top1"] < 0.97 for r in real.values()), {
      p: r["metrics"]["top1"] for p, r in real.items()}
  zoo.gc()  # adapter records are valid for the chain and deltas they were measured on
  assert len(records.read_all(zoo.root, "tiny")) == len(with_delta)

  out = asm.assemble(zoo, "tiny", "tiny-plain", min_top1=0.97, calibration=TOKENS, **OPTS)
  assert [s["position"] for s in out["substitutions"]] == with_delta
  assert out["bytes_saved"] == sum(zoo.manifest("tiny")["delta_bytes"])
  plain = zoo.manifest("tiny-plain")
  assert plain["chain"] == base_chain and "deltas" not in plain
  kept = asm.assemble(zoo, "real", "real-lean", min_top1=0.97, calibration=TOKENS, **OPTS)
  assert kept["substitutions"] == [] and zoo.manifest("real-lean")["deltas"] == deltas["real"]

  prompt = [5, 17, 3, 8, 41, 2, 9]
  config = EngineConfig(batch_size=2, kv_slots=4, max_seq_len=32, prefill_chunk=16,
                        length_buckets=(16,), warmup=False)
  expected = zoo.load_model("base").generate([prompt], max_new_tokens=6)[0].tolist()
  with Engine.from_zoo(zoo.root, ["base", "tiny-plain"], mesh_shape=(1, 1),
                       config=config) as engine:
    assert engine.generate("tiny-plain", prompt, max_new_tokens=6) == expected
    stats = engine.stats()
    assert stats["models"]["tiny-plain"] == stats["models"]["base"]  # the base's instances
