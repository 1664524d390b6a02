"""The routed expert matmul equals the every-expert reference and reads only routed experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jblock.models.moe import routed_experts, tiling


def _reference(x, top_e, top_w, gate, up, down):
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate)) * jnp.einsum("nd,edf->nef", x, up)
  y = jnp.einsum("nef,efd->ned", h, down)  # every expert on every token
  picked = jnp.take_along_axis(y, top_e[:, :, None], axis=1)  # [N, K, D]
  return jnp.sum(picked * top_w[:, :, None], axis=1)


@pytest.mark.parametrize("n,k,e", [(1, 2, 8), (3, 2, 4), (17, 2, 5), (64, 1, 3), (40, 3, 7)])
def test_routed_equals_reference(n, k, e):
  rng = np.random.default_rng(n * 100 + k * 10 + e)
  d, f = 11, 13
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  gate, up = (jnp.asarray(rng.normal(size=(e, d, f)), jnp.float32) for _ in range(2))
  down = jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32)
  # Skewed routing: most assignments to expert 0, some experts unused.
  top_e = jnp.asarray(np.stack([rng.permutation(e)[:k] if i % 3 else np.arange(k)
                                for i in range(n)]), jnp.int32)
  top_w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
  ours = jax.jit(routed_experts, static_argnums=6)(x, top_e, top_w, gate, up, down, jax.nn.silu)
  np.testing.assert_allclose(ours, _reference(x, top_e, top_w, gate, up, down), atol=1e-4, rtol=1e-5)


def test_tiles_follow_routed_tokens():
  # (rows per tile, tiles = expert weight sets gathered).
  assert tiling(2, 8) == (2, 2)  # one token, top-2: reads 2 of 8 experts
  assert tiling(8, 128) == (8, 8)  # one token, top-8 of 128 experts: 8 reads
  assert tiling(16, 8) == (16, 9)  # 8 tokens use about every expert: ~E reads, as dense would
  tile, tiles = tiling(4096, 128)  # 512-token prefill, top-8 of 128
  assert tiles * tile <= 2 * 4096  # computes <= 2x the routed rows, not 512 * 128
