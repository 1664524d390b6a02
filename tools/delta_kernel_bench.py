"""One projection with a bank of compressed deltas: the serving op against its alternatives.

  python -m tools.delta_kernel_bench [--d_in=512 --d_out=1376 --slots=8]

For each encoding and batch shape (8 and 32 one-token rows, 4 rows of a 32-token chunk; every
slot in use), side by side in one run:
  - slot_grouped: what jblock serves (jblock.models.deltas): rows sorted by slot, each active
    slot's packed delta decoded once, only its rows multiplied;
  - per_row: each row gathers its slot's packed bytes and decodes its own dense copy;
  - dense_bank: a dense float32 delta per slot kept resident (no decode; 32x the bytes of
    bitdelta), every row masked by a one-hot over slots;
  - per_model: the same rows served model by model: one dense [in, out] product per slot over its
    own rows (the per-model servers' cost for this projection).
Also the compile time of 42 such projections (6 layers x 7) for a one-token batch of 8.
Results: tools/results/delta_kernel_bench_<time>.json.
"""

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jblock.bench import results
from jblock.models import deltas, qdelta

_D_IN = flags.DEFINE_integer("d_in", 512, "Projection input width.")
_D_OUT = flags.DEFINE_integer("d_out", 1376, "Projection output width.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Bank slots, all in use.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default tools/results/...).")


def _time_ms(fn, *args, n=30):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n * 1e3


def main(argv):
  del argv
  d_in, d_out, n_slots = _D_IN.value, _D_OUT.value, _SLOTS.value
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32) * 0.02)
  rows = []
  for method in qdelta.METHODS:
    enc = [qdelta.encode(method, rng.normal(size=(d_in, d_out)).astype(np.float32) * 1e-3)
           for _ in range(n_slots)]
    bank = {k: jnp.stack([jnp.asarray(e[k]) for e in enc]) for k in enc[0]}
    bank["on"] = jnp.ones(n_slots, jnp.int32)
    packed = {k: v for k, v in bank.items() if k != "on"}
    dense = jnp.stack([qdelta.decode(method, e, d_in) for e in enc])
    full = w[None] + dense

    grouped = jax.jit(lambda x, s: deltas._compressed(x, x @ w, method, bank, s))

    @jax.jit
    def per_row(x, s):
      d = qdelta.decode(method, {k: jnp.take(v, s, axis=0) for k, v in packed.items()}, d_in)
      return x @ w + jnp.einsum("btd,bdo->bto", x, d)

    @jax.jit
    def dense_bank(x, s):
      onehot = (s[:, None] == jnp.arange(n_slots)).astype(x.dtype)
      return x @ w + jnp.einsum("sbtd,sdo->bto", jnp.einsum("bs,btd->sbtd", onehot, x), dense)

    one_model = jax.jit(lambda x, k: x @ k)
    for b, t in ((8, 1), (32, 1), (4, 32)):
      x = jnp.asarray(rng.normal(size=(b, t, d_in)).astype(np.float32))
      s = jnp.asarray(np.arange(b) % n_slots, jnp.int32)
      want = np.asarray(jnp.einsum("btd,bdo->bto", x, full[s]))
      row = {"method": method, "batch": b, "tokens": t}
      for name, fn in (("slot_grouped", grouped), ("per_row", per_row), ("dense_bank", dense_bank)):
        row[f"{name}_ms"] = _time_ms(fn, x, s)
        row[f"{name}_max_err"] = float(np.max(np.abs(np.asarray(fn(x, s)) - want)))
      mine = [x[np.asarray(s) == k] for k in range(n_slots)]
      row["per_model_ms"] = sum(_time_ms(one_model, m, full[k]) for k, m in enumerate(mine) if m.size)
      row["base_ms"] = _time_ms(jax.jit(lambda x: x @ w), x)
      rows.append(row)
      print(f"{method:8s} B={b:2d} T={t:2d}  " + "  ".join(
          f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms")) + " ms")
    x = jnp.ones((8, 1, d_in))
    s = jnp.asarray(np.arange(8) % n_slots, jnp.int32)

    def stack(x, s):
      y = x @ w
      for _ in range(42):
        y = deltas._compressed(x, y, method, bank, s)
      return y

    start = time.perf_counter()
    jax.jit(stack).lower(x, s).compile()
    rows.append({"method": method, "compile_42_projections_s": time.perf_counter() - start})
    print(f"{method:8s} compile of 42 projections: {rows[-1]['compile_42_projections_s']:.2f} s")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
  out = _OUT.value or os.path.join("tools", "results", f"delta_kernel_bench_{stamp}.json")
  results.write_json(out, {"d_in": d_in, "d_out": d_out, "slots": n_slots, "rows": rows,
                           "device": str(jax.devices()[0])})
  print(f"results: {out}")


if __name__ == "__main__":
  app.run(main)
