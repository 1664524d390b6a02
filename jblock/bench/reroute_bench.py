"""Overload bench for on-the-fly rerouting: one tenant's private blocks under a burst.

Three tenants share one engine: A on a full fine-tune `ft-a` (its blocks are A's alone), B on
another fine-tune `ft-b`, C on the base. A sends a burst of `burst` concurrent requests (more
than one batch of its blocks holds); B and C send a few each. Per-block batch sizes: each
fine-tune's private blocks take `batch_size` rows per call, the base's blocks — the ones every
variant can share — `shared_batch_size` (BlockLLM sizes a block's batch by how widely it is
shared), so the base has room the burst cannot use unless it is rerouted there. Rounds alternate between A's
budget 0 (never rerouted: the per-model behaviour) and A's budget (rerouted onto the base's
blocks where its own are overloaded, within the measured loss of the whole-base route), in one
process, so the ratio of p95 latencies compares the two side by side.

Material: a random-weight base and fine-tunes (every tensor perturbed): what this measures is
latency under load; the accuracy cost is the equivalence record's, on random calibration
tokens, and is reported beside it.
"""

import os
import shutil
import time

import numpy as np
from safetensors.numpy import load_file, save_file

from jblock.runtime.engine import Engine, EngineConfig
from jblock.runtime.reroute import RerouteConfig
from jblock.train import variants
from jblock.zoo import equivalence as eqv
from jblock.zoo.store import Zoo

SPEC = variants.BaseSpec(family="llama", hidden=64, layers=4, heads=4, kv_heads=2, vocab=256,
                         max_positions=256)


def _perturb(src: str, dst: str, scale: float, seed: int) -> str:
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  rng = np.random.default_rng(seed)
  for name, t in tensors.items():
    tensors[name] = (t + rng.normal(0, scale * (np.std(t) + 1e-3), t.shape)).astype(t.dtype)
  save_file(tensors, path, metadata={"format": "pt"})
  return dst


def build(work_dir: str, scale: float = 0.02, say=print) -> tuple[Zoo, dict]:
  """base, ft-a, ft-b in a zoo; equivalence records of ft-a: base's block at each position and
  the whole base chain (each position with all the others as context)."""
  zoo = Zoo(os.path.join(work_dir, "zoo"))
  if "ft-b" not in zoo.models():
    base = variants.init_base(SPEC, os.path.join(work_dir, "base"), seed=0, init_std=0.2)
    zoo.convert(base, "base")
    for i, name in enumerate(("ft-a", "ft-b")):
      zoo.convert(_perturb(base, os.path.join(work_dir, name), scale, seed=i + 1), name,
                  lineage={"base_model": "base"})
  tokens = np.random.default_rng(0).integers(0, SPEC.vocab, 4000)
  eq = eqv.Equivalence(zoo, "ft-a", tokens, seq_len=64, max_windows=16)
  base_chain = zoo.manifest("base")["chain"]
  alone = {p: eq.evaluate(p, base_chain[p])["metrics"] for p in range(len(base_chain))}
  last = len(base_chain) - 1
  whole = eq.evaluate(last, base_chain[last],
                      context={p: base_chain[p] for p in range(last)})["metrics"]
  say(f"ft-a vs base: whole-base route top-1 {whole['top1']:.4f} KL {whole['kl']:.4f}")
  return zoo, {"alone": alone, "whole_base": whole}


def run(work_dir: str, rounds: int = 4, burst: int = 12, others: int = 2, new_tokens: int = 16,
        batch_size: int = 4, shared_batch_size: int = 16, say=print) -> dict:
  zoo, measured = build(work_dir, say=say)
  budget = (1.0 - measured["whole_base"]["top1"]) + 1e-6  # exactly what the route measured
  shared = tuple((b, shared_batch_size) for b in zoo.manifest("base")["chain"])
  config = EngineConfig(batch_size=batch_size, batch_size_by_block=shared, kv_slots=32,
                        max_seq_len=64, prefill_chunk=16, length_buckets=(16,),
                        reroute=RerouteConfig())
  out = {"budget_a": budget, "measured": measured, "rounds": [], "config": {
      "burst": burst, "others": others, "new_tokens": new_tokens, "batch_size": batch_size,
      "shared_batch_size": shared_batch_size, "rounds": rounds}}
  with Engine.from_zoo(zoo.root, ["base", "ft-a", "ft-b"], mesh_shape=(1, 1),
                       config=config) as engine:
    _timed_round(engine, budget, burst, others, new_tokens, seed=99)  # compiles the cut routes
    _timed_round(engine, 0.0, burst, others, new_tokens, seed=98)
    before = dict(engine.stats()["reroute"])
    for r in range(rounds):
      for mode, b in (("per_model", 0.0), ("rerouted", budget)) if r % 2 == 0 else (
          ("rerouted", budget), ("per_model", 0.0)):
        lat = _timed_round(engine, b, burst, others, new_tokens, seed=r)
        out["rounds"].append({"mode": mode, "latency_s": lat})
        say(f"round {r} {mode:9s} " + "  ".join(
            f"{t} p95 {np.percentile(v, 95):.3f}s" for t, v in sorted(lat.items())))
    after = engine.stats()["reroute"]
    out["reroute_stats"] = {k: after[k] - before.get(k, 0) for k in after if k != "models"}
  summary = {}
  for mode in ("per_model", "rerouted"):
    lat = {t: [x for r in out["rounds"] if r["mode"] == mode for x in r["latency_s"][t]]
           for t in ("A", "B", "C")}
    summary[mode] = {t: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
                     for t, v in lat.items()}
  summary["p95_ratio_rerouted_over_per_model"] = {
      t: summary["rerouted"][t]["p95"] / summary["per_model"][t]["p95"] for t in ("A", "B", "C")}
  out["summary"] = summary
  return out


def _timed_round(engine, budget_a, burst, others, new_tokens, seed) -> dict[str, list[float]]:
  """Submits the round at once; end-to-end latency of each request by tenant."""
  import threading
  rng = np.random.default_rng(seed)
  jobs = ([("A", "ft-a", budget_a)] * burst + [("B", "ft-b", 0.0)] * others
          + [("C", "base", 0.0)] * others)
  jobs = [jobs[i] for i in rng.permutation(len(jobs))]
  lat: dict[str, list[float]] = {"A": [], "B": [], "C": []}
  lock = threading.Lock()
  threads = []
  for tenant, model, budget in jobs:
    prompt = rng.integers(0, SPEC.vocab, 16).tolist()
    start = time.perf_counter()
    handle = engine.submit(model, prompt, max_new_tokens=new_tokens, tenant=tenant,
                           accuracy_budget=budget)

    def wait(h=handle, s=start, t=tenant):
      h.result(timeout=600)
      with lock:
        lat[t].append(time.perf_counter() - s)

    th = threading.Thread(target=wait)
    th.start()
    threads.append(th)
  for th in threads:
    th.join(600)
  return lat
