"""Compressed weight deltas: the encodings' bytes and errors, and per-row application from a
bank (a base row exact, each other row its own slot's decoded delta)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jblock.models import deltas, qdelta


def _delta(shape, seed=0):
  return np.random.default_rng(seed).normal(0, 0.01, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 96), (37, 5), (130, 7)])
def test_encodings_round_trip_within_their_quantisation_error(shape):
  d = _delta(shape)
  bit = qdelta.encode(qdelta.BITDELTA, d)
  rec = qdelta.decode_np(qdelta.BITDELTA, bit, shape[0])
  # Sign bits: every sign is kept, and the magnitude is the column's mean |delta|.
  assert np.array_equal(rec >= 0, d >= 0)
  np.testing.assert_allclose(np.abs(rec), np.broadcast_to(np.mean(np.abs(d), 0), shape), rtol=1e-6)
  assert bit["bits"].dtype == np.uint8 and bit["bits"].shape == (-(-shape[0] // 8), shape[1])
  for method, levels in ((qdelta.INT8, 127), (qdelta.INT4, 7)):
    enc = qdelta.encode(method, d)
    rec = qdelta.decode_np(method, enc, shape[0])
    g = qdelta.group_size(shape[0])
    padded = np.pad(np.abs(d), ((0, -shape[0] % g), (0, 0))).reshape(-1, g, shape[1])
    step = np.repeat(padded.max(1) / levels, g, axis=0)[:shape[0]]
    assert np.all(np.abs(rec - d) <= step / 2 + 1e-3 * step + 1e-9)
    # The layout a worker checks is exactly what encode makes.
    assert {k: (v.shape, v.dtype) for k, v in enc.items()} == {
        k: (s, t) for k, (s, t) in qdelta.layout(method, *shape).items()}
  sizes = {m: qdelta.nbytes(qdelta.encode(m, d)) / d.nbytes for m in qdelta.METHODS}
  assert sizes[qdelta.BITDELTA] < sizes[qdelta.INT4] < sizes[qdelta.INT8] < 0.4


def test_rows_get_their_own_slots_delta_and_base_rows_stay_exact():
  d_in, d_out, slots = 24, 10, 3
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, d_in)).astype(np.float32))
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
  y = x @ kernel
  per_slot = [_delta((d_in, d_out), s) for s in range(slots)]
  enc = [qdelta.encode(qdelta.INT4, p) for p in per_slot]
  entry = {qdelta.INT4: {k: jnp.stack([e[k] for e in enc]) for k in enc[0]}}
  entry[qdelta.INT4]["on"] = jnp.asarray([1, 0, 1], jnp.int32)  # slot 1 holds another encoding
  entry["bias"] = {"value": jnp.asarray(rng.normal(size=(slots, d_out)), jnp.float32),
                   "on": jnp.asarray([1, 0, 0], jnp.int32)}
  row_slots = jnp.asarray([-1, 2, 0, 1], jnp.int32)
  out = np.asarray(deltas.apply(x, y, (entry, row_slots, None)))
  np.testing.assert_array_equal(out[0], np.asarray(y[0]))  # the base row, bit for bit
  np.testing.assert_array_equal(out[3], np.asarray(y[3]))  # its slot uses neither entry
  for row, slot in ((1, 2), (2, 0)):
    want = np.asarray(x[row]) @ (kernel + qdelta.decode_np(qdelta.INT4, enc[slot], d_in))
    if slot == 0:
      want = want + np.asarray(entry["bias"]["value"][0])
    np.testing.assert_allclose(out[row], want, rtol=1e-5, atol=1e-5)
