"""The per-row LoRA op: base rows (slot -1) are bit-exact even when every bank slot is filled;
adapter rows equal x·(W + a·b) computed densely."""

import jax.numpy as jnp
import numpy as np

from jblock.convert import convert
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta
import pytest

from tests import hf_models


# (3, 4): few bank columns; (16, 64): more slots than rows.
@pytest.mark.parametrize("slots,rank", [(3, 4), (16, 64)])
def test_base_rows_exact_with_every_slot_filled(tmp_path, slots, rank):
  base, _ = hf_models.build("llama", str(tmp_path / "base"))
  layers = convert(base).blocks[1]
  apply = block_fns.apply_fn(layers.kind, layers.config)
  rng = np.random.default_rng(0)
  bank = {}
  for path, (d_in, d_out) in {"attn/q": (40, 40), "attn/o": (40, 40), "mlp/up": (40, 53),
                              "mlp/down": (53, 40)}.items():
    std = .6 / rank ** .5
    bank[f"layer_0/{path}"] = {
        "a": jnp.asarray(rng.normal(0, std, (slots, rank, d_in)), jnp.float32),
        "b": jnp.asarray(rng.normal(0, std, (slots, rank, d_out)), jnp.float32)}
  x = jnp.asarray(rng.normal(0, 1, (4, 5, 40)), jnp.float32)
  meta = contiguous_meta(4, 16, 0, 5)
  kv = lambda: block_fns.init_kv(layers.config, 4, 16, jnp.float32)
  plain, _ = apply(layers.params, kv(), x, meta)
  adapters = jnp.asarray([-1, 0, slots - 1, -1], jnp.int32)
  mixed, _ = apply(layers.params, kv(), x, {**meta, "lora": bank, "adapter": adapters})
  plain, mixed = np.asarray(plain), np.asarray(mixed)
  assert np.array_equal(mixed[[0, 3]], plain[[0, 3]])  # bit-exact, not merely close
  assert np.abs(mixed[[1, 2]] - plain[[1, 2]]).max() > 1e-2
  # Only the batch's bank columns (slots 0 and S-1, -1 padding): the same rows, base exact.
  cols = np.full(4 * rank, -1, np.int32)
  cols[:2 * rank] = np.r_[np.arange(rank), (slots - 1) * rank + np.arange(rank)]
  packed, _ = apply(layers.params, kv(), x, {**meta, "lora": bank, "adapter": adapters,
                                             "lora_cols": jnp.asarray(cols)})
  packed = np.asarray(packed)
  assert np.array_equal(packed[[0, 3]], plain[[0, 3]])
  np.testing.assert_allclose(packed[[1, 2]], mixed[[1, 2]], rtol=1e-5, atol=1e-5)
  # One token per row (a decode step) runs the bank-column form: the batch's columns only
  # equal the whole bank, base rows still exact.
  one = x[:, :1]
  step = lambda extra: np.asarray(apply(layers.params, kv(), one, {
      **contiguous_meta(4, 16, 0, 1), "lora": bank, "adapter": adapters, **extra})[0])
  whole, picked = step({}), step({"lora_cols": jnp.asarray(cols)})
  first, _ = apply(layers.params, kv(), one, contiguous_meta(4, 16, 0, 1))
  assert np.array_equal(picked[[0, 3]], np.asarray(first)[[0, 3]])
  np.testing.assert_allclose(picked[[1, 2]], whole[[1, 2]], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(picked[[1, 2]], mixed[[1, 2], :1], rtol=1e-5, atol=1e-4)
  # Row 2 alone through slot 2 = row 2 in the mixed batch (no cross-row leakage).
  alone, _ = apply(layers.params, block_fns.init_kv(layers.config, 1, 16, jnp.float32), x[2:3],
                   {**contiguous_meta(1, 16, 0, 5), "lora": bank,
                    "adapter": jnp.asarray([slots - 1], jnp.int32)})
  np.testing.assert_allclose(np.asarray(alone)[0], mixed[2], rtol=1e-5, atol=1e-4)
