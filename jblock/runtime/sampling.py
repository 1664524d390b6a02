"""Per-request sampling on device: greedy, temperature, top-k, top-p, seeded.

Each row draws with its own key (`row_key`: its seed and step), so a request's samples do not
depend on which other requests share its batch. The sort that top-k/top-p need costs more
than the LM head itself on a large vocabulary, so batches that need no filtering (or no
sampling at all) skip it at run time (lax.cond).
"""

import jax
import jax.numpy as jnp


def _filter_top_k_top_p(scaled, top_k, top_p):
  vocab = scaled.shape[-1]
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p, and
  # always the most likely token (as vLLM does): a p that rounds to 0 in float32 (1e-50) would
  # otherwise keep nothing and draw from all -inf.
  rank = jnp.arange(vocab)[None, :]
  sorted_desc = jnp.where(rank < k[:, None], sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p[:, None]) | (rank == 0)
  cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def row_key(seed_lo, seed_hi, step):
  """The PRNG key of one row's draw: PRNGKey(low 32 bits), the high 32 bits folded in when set
  (so every uint64 seed is valid and seeds below 2**32 keep their keys), then the step."""
  key = jax.random.PRNGKey(jax.lax.bitcast_convert_type(seed_lo, jnp.uint32))
  key = jnp.where(seed_hi != 0, jax.random.fold_in(key, seed_hi), key)
  return jax.random.fold_in(key, step)


def _filter_min_p(scaled, min_p):
  """Drops tokens whose probability is below min_p x the most likely one's (in logit space:
  below the top logit + log(min_p)); no sort needed."""
  top = jnp.max(scaled, axis=-1, keepdims=True)
  floor = jnp.where(min_p[:, None] > 0, top + jnp.log(jnp.maximum(min_p[:, None], 1e-30)),
                    -jnp.inf)
  return jnp.where(scaled < floor, -jnp.inf, scaled)


def sample(logits, temperature, top_k, top_p, seed_lo, seed_hi, step, min_p=None):
  """logits [B, V] f32; temperature/top_p f32 [B]; top_k/seed_lo/seed_hi/step int32 [B]
  -> tokens int32 [B]. seed_lo/seed_hi are the two 32-bit words of a uint64 seed. min_p
  (f32 [B], optional: jblock.runtime.logits passes it only when a row uses it)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw_rows(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    needs_filter = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1.0)))
    scaled = jax.lax.cond(needs_filter, lambda s: _filter_top_k_top_p(s, top_k, top_p),
                          lambda s: s, scaled)
    if min_p is not None:
      scaled = _filter_min_p(scaled, min_p)

    def draw(row_logits, lo, hi, row_step):
      return jax.random.categorical(row_key(lo, hi, row_step), row_logits).astype(jnp.int32)

    sampled = jax.vmap(draw)(scaled, seed_lo, seed_hi, step)
    return jnp.where(temperature > 0, sampled, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), draw_rows, lambda _: greedy, None)
